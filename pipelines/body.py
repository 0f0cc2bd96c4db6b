"""Where the body is in a CT: the part of the model grid that sliding windows need to cover.

Clinical CTs are reconstructed on a 512 x 512 field of view that the body fills only in
part; windows over air are wasted work. As TotalSegmentator does with its low-resolution
body model, the body is found cheaply before the windows run: the HU volume (already on
the model grid) is averaged down by `factor` per axis, thresholded at `threshold_hu` (air
and lung are below, soft tissue, bone and fat above), opened in the axial plane (which
removes the patient table, a thin curved shell under the patient), and its large connected
components kept (the largest, and any other at least `min_fraction` of its size: arms beside the
torso, the other leg). Their bounding box grown by `margin_mm` is the body's box
(`body_box`); the windows that run are the whole grid's windows that reach into it
(`window_box`), so every voxel of the body's box gets exactly the probabilities of the
uncropped run, and everything outside those windows is background. A body box over
`max_fraction` of the grid saves too little and is not used.

Inside the box, a window can still hold no body (a corner of a 512 x 512 field of view
beside a round torso): `body_mask` is the body grown by `MASK_MARGIN_MM` (and at least one
block) on the model grid, and the sliding window skips every window that holds none of it. A voxel of the grown body
lies only in windows that hold body, so all its windows run and its probabilities are those
of the uncropped run; a voxel outside it is blended from the windows that ran, and is
background where none did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medvit.pipelines.stitch import window_starts

THRESHOLD_HU = -500.0
FACTOR = 4
MARGIN_MM = 10.0
MASK_MARGIN_MM = 5.0
MIN_FRACTION = 0.05
MAX_FRACTION = 0.9


def head_foot_axis(orientation: str) -> int | None:
    """The array axis running head-foot in volumes with these axis codes (2 for RAS); None
    when the codes name none."""
    axes = [a for a, code in enumerate(orientation.upper()) if code in "SI"]
    return axes[0] if axes else None


def body_mask_low(hu: torch.Tensor, factor: int = FACTOR, threshold_hu: float = THRESHOLD_HU,
                  min_fraction: float = MIN_FRACTION, axial_axis: int | None = 2) -> np.ndarray:  # fmt: skip
    """The body at 1/`factor` resolution: a boolean array over the blocks of `hu` `(1, X, Y, Z)`.

    Structures thinner than 3 blocks in the axial plane (the patient table, a blanket, the
    scanner's head rest) are opened away first, and what the opening took from the kept
    components within a block of them is given back; `axial_axis` is the head-foot axis of
    the grid (None: open in all three axes).
    """
    low = F.avg_pool3d(hu[None].float(), factor, ceil_mode=True)[0, 0].numpy() > threshold_hu
    element = np.ones((3, 3, 3), dtype=bool)
    if axial_axis is not None:
        element = np.ones([1 if a == axial_axis else 3 for a in range(3)], dtype=bool)
    opened = ndimage.binary_opening(low, structure=element)
    labels, n = ndimage.label(opened, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return opened
    sizes = np.bincount(labels.ravel())[1:]
    kept = np.isin(labels, np.flatnonzero(sizes >= min_fraction * sizes.max()) + 1)
    # the opening also rounds the body's own narrow ends: give back what lies within a block
    return low & ndimage.binary_dilation(kept, structure=np.ones((3, 3, 3), dtype=bool))


def body_mask(
    hu: torch.Tensor, spacing: Sequence[float], factor: int = FACTOR, margin_mm: float = MASK_MARGIN_MM,
    axial_axis: int | None = 2, low: np.ndarray | None = None,
) -> torch.Tensor | None:
    """The body grown by `margin_mm` and by at least one block (which holds the body voxels of
    the blocks at its edge that are under half body), as a boolean `(X, Y, Z)` over the grid of
    `hu` `(1, X, Y, Z)`; None when no body is found."""
    low = body_mask_low(hu, factor, axial_axis=axial_axis) if low is None else low
    if not low.any():
        return None
    grow = [max(1, int(np.ceil(margin_mm / (s * factor)))) for s in spacing]
    low = ndimage.binary_dilation(low, structure=np.ones([2 * g + 1 for g in grow], dtype=bool))
    mask = torch.from_numpy(low)
    for axis, n in enumerate(hu.shape[1:]):
        mask = mask.repeat_interleave(factor, dim=axis).narrow(axis, 0, n)
    return mask.contiguous()


def body_box(
    hu: torch.Tensor,
    spacing: Sequence[float],
    factor: int = FACTOR,
    margin_mm: float = MARGIN_MM,
    max_fraction: float = MAX_FRACTION,
    axial_axis: int | None = 2,
    low: np.ndarray | None = None,
) -> tuple[slice, slice, slice] | None:
    """The box of the model grid `hu` `(1, X, Y, Z)` (Hounsfield units) that holds the body.

    Args:
        hu: The scan on the model grid, in HU.
        spacing: The model grid's voxel size (mm).
        factor: Downsampling of the body search.
        margin_mm: Margin around the body.
        max_fraction: Above this fraction of the grid's voxels, no box (None).
        axial_axis: The grid's head-foot axis (`body_mask_low`).
        low: `body_mask_low`'s result when the caller has it (computed otherwise).

    Returns:
        One slice per axis, or None when no body is found or the box would save little.
    """
    mask = body_mask_low(hu, factor, axial_axis=axial_axis) if low is None else low
    if not mask.any():
        return None
    size = hu.shape[1:]
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = int(np.ceil(margin_mm / spacing[axis]))
        box.append(slice(max(0, int(hit[0]) * factor - margin), min(size[axis], (int(hit[-1]) + 1) * factor + margin)))
    kept = np.prod([s.stop - s.start for s in box]) / float(np.prod(size))
    return None if kept > max_fraction else (box[0], box[1], box[2])


def window_box(
    body: Sequence[slice], size: Sequence[int], window: Sequence[int], overlap: float, slice_axis: int | None = None,
    halo: int = 0,
) -> tuple[slice, slice, slice]:
    """The part of the grid made of the sliding windows that touch `body`.

    Along each axis the box runs from the first window (of the whole grid's windows, as
    MONAI places them) that reaches into `body` to the end of the last one, so the windows
    a sliding window over the box places are exactly those windows: every voxel of `body`
    gets the same windows, weights and so probabilities as over the whole grid. Along a 2D
    model's `slice_axis` the box is `body` grown by `halo` slices (the slab's neighbours).
    """
    box = []
    for axis, (b, n, w) in enumerate(zip(body, size, window)):
        if axis == slice_axis:
            box.append(slice(max(0, b.start - halo), min(n, b.stop + halo)))
            continue
        if w >= n:
            box.append(slice(0, n))
            continue
        touching = [s for s in window_starts(n, w, overlap) if s < b.stop and s + w > b.start]
        box.append(slice(touching[0], touching[-1] + w))
    return box[0], box[1], box[2]
