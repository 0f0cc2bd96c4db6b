"""Pictures of `medvit attention`, drawn with PIL: heat-map overlays and the distance plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from medvit.pipelines.atomic import write_atomic
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 256  # overlays are enlarged (nearest) until their shorter side is at least this
HEAT_ALPHA = 0.55
# a perceptually ordered ramp (dark blue, purple, red, orange, yellow), interpolated linearly
_RAMP = np.array([[0, 0, 40], [90, 20, 130], [200, 40, 70], [250, 140, 20], [255, 240, 90]], np.float64)
# head colours of the distance plot
_HEADS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """`values` in 0..1 as RGB `(..., 3)` floats along the ramp."""
    t = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    return _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac


def overlay_image(grey: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """`grey` (0..1) under `heat` stretched to its own range (min to max), as uint8 RGB."""
    lo, hi = float(heat.min()), float(heat.max())
    scaled = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    rgb = (1 - HEAT_ALPHA) * grey[..., None] * 255.0 + HEAT_ALPHA * heat_colours(scaled)
    return np.rint(rgb).clip(0, 255).astype(np.uint8)


def write_overlay(
    path: Path, grey: np.ndarray, heat: np.ndarray, title: str, mark: tuple[float, float] | None = None
) -> Path:
    """A PNG of `heat` over `grey` (same shape), a title above, `mark` (row, col) crossed."""
    rgb = overlay_image(grey, heat)
    zoom = max(1, -(-MIN_SIDE // min(rgb.shape[:2])))
    img = Image.fromarray(rgb).resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.NEAREST)
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (img.width, img.height + 18), (0, 0, 0))
    canvas.paste(img, (0, 18))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill=(255, 255, 255), font=font)
    if mark is not None:
        r, c = (mark[0] + 0.5) * zoom + 18, (mark[1] + 0.5) * zoom
        draw.line([(c - 6, r), (c + 6, r)], fill=(0, 255, 255), width=2)
        draw.line([(c, r - 6), (c, r + 6)], fill=(0, 255, 255), width=2)
    return write_atomic(path, lambda tmp: canvas.save(tmp, format="PNG"))


def _nice_top(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above `value`."""
    if value <= 0:
        return 1.0
    power = 10 ** np.floor(np.log10(value))
    for m in (1, 2, 5, 10):
        if m * power >= value:
            return float(m * power)
    return float(10 * power)


def write_distance_plot(
    path: Path, points: Sequence[tuple[int, float]], ylabel: str, size: tuple[int, int] = (640, 400)
) -> Path:
    """Mean attention distance against the layer: one dot per `(layer, distance)`, coloured
    by its rank within the layer (the head), as Fig. 7 of the ViT paper."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 45
    layers = sorted({p[0] for p in points})
    ymax = _nice_top(max((p[1] for p in points), default=1.0))
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = left, w - right, h - bottom, top

    def px(i: int) -> float:
        return x0 + (layers.index(i) + 0.5) / len(layers) * (x1 - x0)

    def py(v: float) -> float:
        return y0 - v / ymax * (y0 - y1)

    for k in range(6):
        v = ymax * k / 5
        draw.line([(x0, py(v)), (x1, py(v))], fill=(230, 230, 230))
        draw.line([(x0 - 4, py(v)), (x0, py(v))], fill=(0, 0, 0))
        draw.text((4, py(v) - 6), f"{v:g}", fill=(0, 0, 0), font=font)
    draw.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
    step = max(1, len(layers) // 16)
    for i in layers[::step]:
        draw.line([(px(i), y0), (px(i), y0 + 4)], fill=(0, 0, 0))
        draw.text((px(i) - 6, y0 + 6), str(i), fill=(0, 0, 0), font=font)
    draw.text((x0, h - 16), "attention layer (call order)", fill=(0, 0, 0), font=font)
    draw.text((x0, 8), ylabel, fill=(0, 0, 0), font=font)
    seen: dict[int, int] = {}
    for layer, value in points:
        head = seen.get(layer, 0)
        seen[layer] = head + 1
        cx, cy = px(layer), py(value)
        draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=_HEADS[head % len(_HEADS)])
    return write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))
