"""Preview PNG: three orthogonal slices of a scan with its mask overlaid."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

# A distinct colour per label index (cycled), background transparent.
_PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]],
    dtype=np.float32,
)


VIEW_HEIGHT = 256  # pixels; each view is scaled to this height with its physical aspect


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ornt = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, ornt)


def _ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size along the RAS-reordered axes."""
    ornt = nib.orientations.io_orientation(affine)
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    out = np.empty(3)
    out[ornt[:, 0].astype(int)] = sizes
    return out


def _scaled(rgb: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Resize a view so pixels are square in millimetres and it is VIEW_HEIGHT tall."""
    h_mm, w_mm = rgb.shape[0] * row_mm, rgb.shape[1] * col_mm
    width = max(1, round(VIEW_HEIGHT * w_mm / h_mm))
    return np.asarray(Image.fromarray(rgb).resize((width, VIEW_HEIGHT), Image.NEAREST))


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def _overlay(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rgb = np.repeat(img[..., None] * 255.0, 3, axis=-1)
    labels = np.unique(mask[mask > 0])
    for lab in labels:
        sel = mask == lab
        rgb[sel] = 0.55 * rgb[sel] + 0.45 * _PALETTE[(int(lab) - 1) % len(_PALETTE)]
    return rgb.astype(np.uint8)


def write_preview(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, out_path: str | Path) -> Path:
    """Axial, coronal and sagittal slices through the mask's centre (radiological view).

    Slices are taken in RAS orientation, so the picture looks the same whatever the
    scan's voxel order; with an empty mask the volume centre is used.
    """
    img = _window(_to_ras(image.astype(np.float32), affine))
    lab = _to_ras(mask, affine)
    centre = np.argwhere(lab > 0).mean(0).round().astype(int) if lab.any() else np.array(lab.shape) // 2
    x, y, z = centre
    sx, sy, sz = _ras_spacing(affine)
    # rot90 puts anterior / superior at the top; fliplr gives the radiological left-right
    views = [
        _scaled(np.ascontiguousarray(np.fliplr(np.rot90(_overlay(img[:, :, z], lab[:, :, z])))), sy, sx),
        _scaled(np.ascontiguousarray(np.fliplr(np.rot90(_overlay(img[:, y, :], lab[:, y, :])))), sz, sx),
        _scaled(np.ascontiguousarray(np.rot90(_overlay(img[x, :, :], lab[x, :, :]))), sz, sy),
    ]
    height = max(v.shape[0] for v in views)
    padded = [np.pad(v, ((0, height - v.shape[0]), (0, 4), (0, 0))) for v in views]
    canvas = np.concatenate(padded, axis=1)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".tmp-{secrets.token_hex(4)}-{out_path.name}")
    try:
        Image.fromarray(np.ascontiguousarray(canvas)).save(tmp, format="PNG")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
