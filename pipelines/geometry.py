"""Model-space geometry for inference, computed as MONAI computes it, without importing MONAI.

`medvit segment` needs three things from the preprocessing: the model-space grid (MONAI's
`Orientationd` + `Spacingd` rules: `zoom_affine` and `compute_shape_offset`) and the volume
sampled on it (trilinear, edge values outside, like `Spacingd`'s bilinear/border
resampling), both here, and the intensity preset (`intensity`). Importing MONAI costs
~300 MB of memory and seconds of start-up, more than the whole inference of a small scan,
so these are written here and tested against MONAI's transforms
(`tests/pipelines/test_geometry.py`). Sampling goes slab by slab straight from the scan's
own array (`sampling`), so a large scan is never copied to float32 in full; the same
sampler maps probabilities back onto the scan's grid (`stitch`).
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel.orientations as nio
import numpy as np
import torch

from medvit.pipelines.sampling import sample_slab, slabs

def orient_affine(affine: np.ndarray, shape: Sequence[int], axcodes: str = "RAS") -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of the volume reoriented to `axcodes` (MONAI's `Orientation`)."""
    src = nio.io_orientation(affine)
    dst = nio.axcodes2ornt(axcodes)
    ornt = nio.ornt_transform(src, dst)
    new_affine = affine @ nio.inv_ornt_aff(ornt, shape)
    new_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):  # input axis -> (output axis, flip)
        new_shape[int(target)] = int(shape[axis])
    return new_affine, tuple(new_shape)


def zoom_affine(affine: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The affine's rotation with voxel sizes `spacing` (MONAI's `zoom_affine`, diagonal=False)."""
    rzs = affine[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zs)
    out = np.eye(4)
    out[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(np.asarray(spacing, dtype=float)))
    return out


def shape_offset(
    shape: Sequence[int], in_affine: np.ndarray, out_affine: np.ndarray
) -> tuple[tuple[int, ...], np.ndarray]:
    """Output shape and origin covering the input's voxel centres (MONAI's `compute_shape_offset`)."""
    dims = np.asarray(shape, dtype=float)
    corners = np.asarray(np.meshgrid(*[(0.0, d - 1.0) for d in dims], indexing="ij")).reshape(3, -1)
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    out = np.linalg.solve(out_affine, in_affine) @ corners
    world = in_affine @ corners
    dist = out[:-1].copy()
    out_shape = np.round(np.ptp(out[:-1] / out[-1], axis=1) + 1.0)
    for i in range(corners.shape[1]):
        if np.allclose(np.min(dist - dist[:, i : i + 1], 1), 0.0, rtol=1e-3):
            return tuple(int(s) for s in out_shape), world[:-1, i]
    offset = in_affine[:3, :3] @ (dims / 2.0) + in_affine[:3, 3] - out_affine[:3, :3] @ (out_shape / 2.0)
    return tuple(int(s) for s in out_shape), offset


def model_grid(
    affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float] | None, axcodes: str = "RAS"
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Affine and shape of the model-space grid of a scan (orientation, then target spacing)."""
    oriented, oshape = orient_affine(np.asarray(affine, dtype=float), shape, axcodes)
    if spacing is None:
        return oriented, oshape
    new = zoom_affine(oriented, spacing)
    out_shape, offset = shape_offset(oshape, oriented, new)
    new[:3, 3] = offset
    return new, out_shape


def resample_scan(
    array: np.ndarray, model_affine: np.ndarray, scan_affine: np.ndarray, shape: Sequence[int], budget: int = 1 << 19
) -> torch.Tensor:
    """The scan `array` (i, j, k) sampled on the model grid: float32 `(1, *shape)`."""
    voxel_map = np.linalg.solve(np.asarray(scan_affine, dtype=float), model_affine)
    exact = _reindex(array, voxel_map, shape)
    if exact is not None:
        return exact

    def box(lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
        block = array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))[None]

    out = torch.empty(1, *shape, dtype=torch.float32)
    for k0, k1 in slabs(shape[2], shape[0] * shape[1], budget):
        out[..., k0:k1] = sample_slab(box, array.shape, voxel_map, shape, k0, k1)
    return out


def _reindex(array: np.ndarray, voxel_map: np.ndarray, shape: Sequence[int]) -> torch.Tensor | None:
    """The grid as a pure re-indexing of the array (axis permutation, flips, integer shift),
    exactly, when the voxel map is one (reorientation without resampling); else None."""
    m = voxel_map[:3]
    if not np.allclose(m, np.round(m), atol=1e-6):
        return None
    m = np.round(m).astype(int)
    rot = m[:, :3]
    if sorted(np.abs(rot).sum(0)) != [1, 1, 1] or sorted(np.abs(rot).sum(1)) != [1, 1, 1]:
        return None
    index = []
    for out_axis in range(3):
        src = int(np.flatnonzero(rot[:, out_axis])[0])
        step, start = int(rot[src, out_axis]), int(m[src, 3])
        stop = start + step * (shape[out_axis] - 1)
        if min(start, stop) < 0 or max(start, stop) >= array.shape[src]:
            return None
        index.append((src, start, step))
    view = np.transpose(array, [src for src, _, _ in index])
    view = view[np.ix_(*[start + step * np.arange(n) for (_, start, step), n in zip(index, shape)])]
    return torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32))[None]
