"""Preview PNG: three orthogonal slices of a scan with its mask overlaid, and a legend.

The views follow the radiological conventions whatever the file's voxel order. The
scan is taken along the patient axes nearest to its affine's voxel axes (RAS, LPS or a
slightly oblique scan all give the same picture; nothing is resampled), then shown as

- axial: seen from the feet, the patient's right on the image's left, anterior at the top;
- coronal: seen from the front, the patient's right on the image's left, head up;
- sagittal: seen from the patient's left, anterior on the image's left, head up;

with square pixels in millimetres. Below the views, a legend gives each label's colour
(`palette`) and name (and says which labels the mask does not contain). The legend is also
stored in the PNG as the text chunk `medvit:legend` (JSON), so programs can read it back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.palette import label_colour

__all__ = ["LEGEND_KEY", "LegendEntry", "Preview", "render_preview", "write_preview"]

OVERLAY_ALPHA = 0.45
VIEW_HEIGHT = 256  # pixels; each view is scaled to this height with its physical aspect
GAP = 4  # black pixels between views
LEGEND_KEY = "medvit:legend"
_ROW = 18  # legend row height
_SWATCH = 12
_FONT_PX = 13
_TEXT = (255, 255, 255)
PLANES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class LegendEntry:
    """One line of the legend.

    Attributes:
        label: Label id in the mask.
        name: Label name (`label <id>` when none was given).
        colour: RGB of the label's swatch; overlaid voxels blend the scan with it.
        found: Whether the mask has any voxel of this label (anywhere, not only in the views).
        swatch: (top, left, height, width) of the colour square on the canvas.
        text: (top, left) of the label's text on the canvas.
    """

    label: int
    name: str
    colour: tuple[int, int, int]
    found: bool
    swatch: tuple[int, int, int, int]
    text: tuple[int, int]

    @property
    def caption(self) -> str:
        return _caption(self.name, self.found)


def _caption(name: str, found: bool) -> str:
    return name if found else f"{name} (not found)"


@dataclass
class Preview:
    """A rendered preview.

    Attributes:
        pixels: `(H, W, 3)` uint8 RGB canvas.
        panels: Plane name -> (top, left, height, width) of its view on the canvas.
        legend: Legend entries in label order.
    """

    pixels: np.ndarray
    panels: dict[str, tuple[int, int, int, int]]
    legend: list[LegendEntry]


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    # io_orientation picks, per voxel axis, the nearest patient axis: oblique scans are
    # shown along their nearest axes rather than resampled
    return nib.orientations.apply_orientation(array, nib.orientations.io_orientation(affine))


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along the RAS-reordered axes."""
    ornt = nib.orientations.io_orientation(affine)
    out = np.empty(3)
    out[ornt[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    return out


def _display(plane: np.ndarray) -> np.ndarray:
    """Turn a RAS slice `(u, v)` into image rows and columns.

    For each plane the first in-plane RAS axis must run right-to-left on the image (axial,
    coronal: x = patient's right on the left; sagittal: y = anterior on the left) and the
    second bottom-to-top (anterior or superior at the top): both reversed, then transposed.
    """
    return np.ascontiguousarray(plane[::-1, ::-1].T)


def _scaled(rgb: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Resize a view so pixels are square in millimetres and it is VIEW_HEIGHT tall."""
    h_mm, w_mm = rgb.shape[0] * row_mm, rgb.shape[1] * col_mm
    width = max(1, round(VIEW_HEIGHT * w_mm / h_mm))
    return np.asarray(Image.fromarray(rgb).resize((width, VIEW_HEIGHT), Image.NEAREST))


def _overlay(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=-1)
    for lab in np.unique(mask[mask > 0]):
        sel = mask == lab
        rgb[sel] = (1.0 - OVERLAY_ALPHA) * rgb[sel] + OVERLAY_ALPHA * np.asarray(label_colour(lab), np.float32)
    return np.rint(rgb).astype(np.uint8)


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=_FONT_PX)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text_width(text: str) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font())
    return int(np.ceil(right - left))


def _legend_entries(
    mask: np.ndarray, label_names: Mapping[int, str] | None
) -> list[tuple[int, str, bool]]:
    present = set(int(v) for v in np.unique(mask)) - {0}
    names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) != 0}
    for lab in present - set(names):
        names[lab] = f"label {lab}"
    return [(lab, names[lab], lab in present) for lab in sorted(names)]


def render_preview(
    image: np.ndarray, mask: np.ndarray, affine: np.ndarray, label_names: Mapping[int, str] | None = None
) -> Preview:
    """Axial, coronal and sagittal slices through the mask's centre, and a legend.

    Args:
        image: Scan voxels in file order (i, j, k).
        mask: Label ids on the same grid.
        affine: Voxel (i, j, k) to RAS millimetres.
        label_names: Label id -> name for the legend (every named label gets a line;
            ids in the mask without a name are listed as `label <id>`).

    Returns:
        The canvas with where each view and legend entry lies on it. With an empty mask
        the slices go through the volume's centre.
    """
    if image.shape != mask.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and mask {mask.shape} must be the same 3D grid")
    img = _to_ras(image, affine)
    lab = _to_ras(mask, affine)
    centre = np.argwhere(lab > 0).mean(0).round().astype(int) if lab.any() else np.array(lab.shape) // 2
    x, y, z = centre
    sx, sy, sz = _ras_spacing(affine)
    # (grey, labels, row mm, column mm) of the axial, coronal and sagittal slice
    cuts = [
        (img[:, :, z], lab[:, :, z], sy, sx),
        (img[:, y, :], lab[:, y, :], sz, sx),
        (img[x, :, :], lab[x, :, :], sz, sy),
    ]
    # one grey window for the three slices: percentiles of the whole volume would cost a
    # float copy of it, for a picture that shows only these pixels
    shown = np.concatenate([c[0].ravel() for c in cuts]).astype(np.float32)
    lo, hi = np.percentile(shown, [1, 99])
    views = []
    for grey, labels, row_mm, col_mm in cuts:
        windowed = np.clip((_display(grey).astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
        views.append(_scaled(_overlay(windowed, _display(labels)), row_mm, col_mm))

    entries = _legend_entries(mask, label_names)
    text_w = max((_text_width(_caption(name, found)) for _, name, found in entries), default=0)
    col_w = 4 + _SWATCH + 6 + text_w + 12
    views_w = sum(v.shape[1] for v in views) + GAP * (len(views) - 1)
    width = max(views_w, col_w if entries else 0)
    n_cols = max(1, width // col_w)
    n_rows = -(-len(entries) // n_cols)
    legend_h = n_rows * _ROW + 6 if entries else 0
    canvas = np.zeros((VIEW_HEIGHT + legend_h, width, 3), dtype=np.uint8)
    panels, left = {}, 0
    for name, view in zip(PLANES, views):
        canvas[:VIEW_HEIGHT, left : left + view.shape[1]] = view
        panels[name] = (0, left, VIEW_HEIGHT, view.shape[1])
        left += view.shape[1] + GAP

    pil = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pil)
    legend = []
    for n, (lab_id, name, found) in enumerate(entries):
        row, col = divmod(n, n_cols)
        top, x0 = VIEW_HEIGHT + 6 + row * _ROW, col * col_w + 4
        colour = label_colour(lab_id)
        swatch = (top + (_ROW - _SWATCH) // 2 - 2, x0, _SWATCH, _SWATCH)
        entry = LegendEntry(lab_id, name, colour, found, swatch, (top, x0 + _SWATCH + 6))
        draw.rectangle([swatch[1], swatch[0], swatch[1] + _SWATCH - 1, swatch[0] + _SWATCH - 1], fill=colour)
        draw.text((entry.text[1], entry.text[0]), entry.caption, fill=_TEXT, font=_font())
        legend.append(entry)
    return Preview(np.asarray(pil), panels, legend)


def write_preview(
    image: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    out_path: str | Path,
    label_names: Mapping[int, str] | None = None,
) -> Path:
    """Write `render_preview`'s picture as a PNG (written under a temporary name, then renamed).

    Args:
        image: Scan voxels in file order (i, j, k).
        mask: Label ids on the same grid.
        affine: Voxel (i, j, k) to RAS millimetres.
        out_path: Destination PNG.
        label_names: Label id -> name for the legend.

    Returns:
        The written path.
    """
    preview = render_preview(image, mask, affine, label_names)
    info = PngInfo()
    info.add_text(LEGEND_KEY, json.dumps([
        {"label": e.label, "name": e.name, "colour": "#{:02x}{:02x}{:02x}".format(*e.colour), "found": e.found}
        for e in preview.legend
    ]))
    return write_atomic(out_path, lambda tmp: Image.fromarray(preview.pixels).save(tmp, format="PNG", pnginfo=info))
