"""Model-space geometry for inference, computed as MONAI computes it, without importing MONAI.

`medvit segment` needs three things from the preprocessing: the model-space grid (MONAI's
`Orientationd` + `Spacingd` rules: `zoom_affine` and `compute_shape_offset`) and the volume
sampled on it (trilinear, edge values outside, like `Spacingd`'s bilinear/border
resampling), both here, and the intensity preset (`intensity`). Importing MONAI costs
~300 MB of memory and seconds of start-up, more than the whole inference of a small scan,
so these are written here and tested against MONAI's transforms
(`tests/pipelines/test_geometry.py`). Sampling goes slab by slab straight from the scan's
own array, so a large scan is never copied to float32 in full; the same sampler maps
probabilities back onto the scan's grid (`stitch`). Spacingd keeps the scan's direction
cosines, so the model grid's axes follow the scan's one to one (permuted, flipped, scaled):
trilinear sampling is then three 1D interpolations (`_separable`), 2x faster on a CPU
than `grid_sample`, which remains for maps that rotate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import nibabel.orientations as nio
import numpy as np
import torch
import torch.nn.functional as F

Box = Callable[[Sequence[int], Sequence[int]], torch.Tensor]


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


def slabs(n: int, voxels_per_plane: int, budget: int) -> Iterator[tuple[int, int]]:
    """Ranges along the last axis holding about `budget` voxels each."""
    step = max(1, budget // max(voxels_per_plane, 1))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def sample_slab(
    box: Box, size: Sequence[int], voxel_map: np.ndarray, shape: Sequence[int], k0: int, k1: int
) -> torch.Tensor:
    """Trilinear samples `(C, I, J, k1 - k0)` of a volume at grid voxels `[:, :, k0:k1]`.

    Args:
        box: Returns the volume's float32 `(C, ...)` block between two corners (lo, hi).
        size: The sampled volume's spatial shape.
        voxel_map: 4x4 map from output grid voxels to the volume's voxel coordinates.
        shape: The output grid.
        k0: First output plane.
        k1: End of the output planes.
    """
    m = torch.as_tensor(voxel_map, dtype=torch.float64)
    axes = _axis_aligned(np.asarray(voxel_map, dtype=float))
    if axes is not None:  # each volume axis follows one output axis: three 1D interpolations
        ranges = [torch.arange(shape[0], dtype=torch.float64), torch.arange(shape[1], dtype=torch.float64),
                  torch.arange(k0, k1, dtype=torch.float64)]  # fmt: skip
        pos = [m[a, axes[a]] * ranges[axes[a]] + m[a, 3] for a in range(3)]
        lo, hi = _block_bounds(pos, size)
        return _separable(box(lo, hi), [p - lo[a] for a, p in enumerate(pos)], axes)
    i = torch.arange(shape[0], dtype=torch.float64)[:, None, None]
    j = torch.arange(shape[1], dtype=torch.float64)[None, :, None]
    k = torch.arange(k0, k1, dtype=torch.float64)[None, None, :]
    coords = [m[a, 0] * i + m[a, 1] * j + m[a, 2] * k + m[a, 3] for a in range(3)]  # each (I, J, k)
    lo, hi = _block_bounds(coords, size)
    block = box(lo, hi)
    grid = []
    for a in range(3):
        n = hi[a] - lo[a]
        c = (coords[a] - lo[a]).clamp_(0, n - 1)  # edge values outside the volume
        grid.append((2 * c / (n - 1) - 1) if n > 1 else torch.zeros_like(c))
    # grid_sample takes (x, y, z) = (last, middle, first) axis of the sampled block
    g = torch.stack(grid[::-1], dim=-1).to(torch.float32)[None]
    return F.grid_sample(block[None], g, mode="bilinear", padding_mode="border", align_corners=True)[0]


def _block_bounds(coords: Sequence[torch.Tensor], size: Sequence[int]) -> tuple[list[int], list[int]]:
    """The block of the volume that trilinear samples at `coords` (one tensor per axis) read."""
    lo = [min(max(int(math.floor(float(c.min()))), 0), size[a] - 1) for a, c in enumerate(coords)]
    hi = [max(min(int(math.floor(float(c.max()))) + 2, size[a]), lo[a] + 1) for a, c in enumerate(coords)]
    return lo, hi


def _axis_aligned(voxel_map: np.ndarray) -> list[int] | None:
    """For each volume axis, the one output axis its coordinate follows, when the map is an
    axis permutation with scales and flips (no rotation or shear); else None."""
    m = np.abs(voxel_map[:3, :3])
    nonzero = m > 1e-12 * m.max()
    if not ((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all()):
        return None
    return [int(np.flatnonzero(row)[0]) for row in nonzero]


def _separable(block: torch.Tensor, positions: list[torch.Tensor], axes: list[int]) -> torch.Tensor:
    """Trilinear samples of `block` `(C, *n)` on an axis-aligned grid, as three 1D linear
    interpolations: the values of `grid_sample`'s border-clamped trilinear sampling, at a
    fraction of its cost on a CPU (each pass is a gather and a lerp of contiguous rows).

    Args:
        block: The volume's block.
        positions: Per block axis, its coordinates (in the block) along the output axis it follows.
        axes: Per block axis, the output axis it follows.

    Returns:
        `(C, *output shape)`, the output axes in order.
    """
    x = block
    dims = [0, 1, 2, 3]  # which of the block's dims (channel first) each dim of `x` holds
    # the axes that shrink first: later passes then run over fewer values
    for a in sorted(range(3), key=lambda a: len(positions[a]) / block.shape[1 + a]):
        n = block.shape[1 + a]
        c = positions[a].clamp(0, n - 1)  # edge values outside the volume
        i0 = c.floor().long()
        i1 = (i0 + 1).clamp(max=n - 1)
        # gathers along the first dim copy whole contiguous rows (5x faster than along an inner one)
        x = x.movedim(dims.index(1 + a), 0).contiguous()
        dims.insert(0, dims.pop(dims.index(1 + a)))
        w = (c - i0).to(x.dtype).view(-1, 1, 1, 1)
        x = x.index_select(0, i0).lerp_(x.index_select(0, i1), w)
    # back to (C, output axes in order), as a view
    order = [0] + [1 + axes.index(b) for b in range(3)]
    return x.permute([dims.index(d) for d in order])


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
