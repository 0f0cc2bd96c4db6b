"""The robustness curves as one PNG, drawn with Pillow: a panel per perturbation, mean Dice
per label against severity, a shared legend of label colours (those of the mask previews)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.palette import label_colour

__all__ = ["plot_curves"]

PANEL_W, PANEL_H = 360, 270
# Plot area inside a panel: left, top, right, bottom margins (room for ticks and titles).
_MARGIN = (48, 28, 16, 46)
_COLUMNS = 3
_FONT_PX = 13
_BACKGROUND, _AXES, _GRID, _TEXT = (255, 255, 255), (40, 40, 40), (225, 225, 225), (20, 20, 20)
_DICE_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)
_LEGEND_ROW = 18
_INSET = 12
_SWATCH = 18


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=_FONT_PX)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, anchor: str) -> None:
    draw.text(xy, text, fill=_TEXT, font=_font(), anchor=anchor)


def _value(v: float) -> str:
    return f"{v:g}"


def _panel(draw: ImageDraw.ImageDraw, x0: int, y0: int, name: str, rows: Sequence[dict]) -> None:
    """One perturbation's panel: axes, Dice grid, ticks at its levels labelled with the parameter's values."""
    left, top = x0 + _MARGIN[0], y0 + _MARGIN[1]
    right, bottom = x0 + PANEL_W - _MARGIN[2], y0 + PANEL_H - _MARGIN[3]
    levels = sorted({int(r["level"]) for r in rows})
    lo, hi = min(levels), max(levels)

    def px(level: int) -> float:  # levels inset from the axes, so end points stay clear of them
        inner = right - left - 2 * _INSET
        return (left + right) / 2 if hi == lo else left + _INSET + inner * (level - lo) / (hi - lo)

    def py(dice: float) -> float:
        return bottom - (bottom - top) * min(max(dice, 0.0), 1.0)

    _text(draw, ((left + right) / 2, y0 + 6), name, "mt")
    for tick in _DICE_TICKS:
        y = py(tick)
        draw.line([(left, y), (right, y)], fill=_GRID)
        _text(draw, (left - 5, y), f"{tick:g}", "rm")
    values = {int(r["level"]): r["value"] for r in rows}
    for level in levels:
        x = px(level)
        draw.line([(x, bottom), (x, bottom + 4)], fill=_AXES)
        _text(draw, (x, bottom + 6), _value(float(values[level])), "mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXES, width=1)
    _text(draw, ((left + right) / 2, bottom + 24), str(rows[0]["parameter"]), "mt")
    _text(draw, (x0 + 4, top - 16), "Dice", "lt")

    by_label: dict[int, list[dict]] = {}
    for r in rows:
        by_label.setdefault(int(r["label_id"]), []).append(r)
    for label_id, points in sorted(by_label.items()):
        colour = label_colour(label_id)
        xy = [(px(int(p["level"])), py(float(p["dice"]))) for p in sorted(points, key=lambda p: int(p["level"]))]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)


def plot_curves(means: Sequence[dict], path: str | Path) -> Path:
    """Draw mean Dice per label against severity, a panel per perturbation, and write the PNG atomically.

    Args:
        means: Rows of `summarize_curve` (perturbation, level, parameter, value, label_id,
            label, dice).
        path: The PNG to write.

    Returns:
        `path`.
    """
    perturbations = list(dict.fromkeys(r["perturbation"] for r in means))
    labels = dict(sorted({int(r["label_id"]): str(r["label"]) for r in means}.items()))
    columns = max(1, min(_COLUMNS, len(perturbations)))
    panel_rows = max(1, -(-len(perturbations) // columns))
    width = columns * PANEL_W
    legend = _legend_layout(labels, width)
    height = panel_rows * PANEL_H + 12 + _LEGEND_ROW * (1 + max((row for _, row, _ in legend), default=0))
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(perturbations):
        x0, y0 = (i % columns) * PANEL_W, (i // columns) * PANEL_H
        _panel(draw, x0, y0, name, [r for r in means if r["perturbation"] == name])
    for x, row, label_id in legend:
        y = panel_rows * PANEL_H + 6 + row * _LEGEND_ROW
        draw.rectangle([x, y + 3, x + _SWATCH, y + 11], fill=label_colour(label_id))
        _text(draw, (x + _SWATCH + 6, y + 7), labels[label_id], "lm")
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _legend_layout(labels: dict[int, str], width: int) -> list[tuple[int, int, int]]:
    """(x, row, label id) of each legend entry: entries side by side, wrapped at `width`."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out, x, row = [], _MARGIN[0], 0
    for label_id, name in labels.items():
        left, _, right, _ = draw.textbbox((0, 0), name, font=_font())
        entry = _SWATCH + 6 + int(right - left) + 20
        if x + entry > width and x > _MARGIN[0]:
            x, row = _MARGIN[0], row + 1
        out.append((x, row, label_id))
        x += entry
    return out
