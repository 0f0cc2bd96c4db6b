"""Sliding-window inference in bounded memory, and inversion onto the scan's grid by slabs.

What MONAI's `sliding_window_inference` + `Invertd` compute, without ever holding a float32
`classes x voxels` volume of the whole scan:

- `stream_probabilities`: windows are visited in rows of equal start along the last axis.
  A row's gaussian-weighted logits go into an accumulator one window deep; once a row is
  done, the planes no later window touches are final, so they are normalised, turned into
  probabilities and stored (in `store_dtype`, fp16 on the default path) in the model-space
  probability volume. Window positions, gaussian weights and padding are MONAI's.
- `stream_slice_probabilities` / `slice_windows`: the same for 2D models, slice batch by
  slice batch, in plane (neither imports MONAI).
- `invert_argmax` / `invert_probabilities`: each slab of the scan's own grid is mapped
  into model space with the affine the preprocessing produced, the probabilities are
  trilinearly interpolated there (edge values outside, as MONAI's `Spacingd` inversion
  does) and reduced to labels slab by slab.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from medvit.pipelines.runtime import reuse_large_blocks
from medvit.pipelines.sampling import sample_slab, sample_slab_argmax, slabs
from medvit.pipelines.slicing import SliceSpec, slab_stack

Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis, as MONAI places them (the last window ends at the edge)."""
    if roi >= size:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / interval)) if d * interval + roi >= size) + 1
    return [min(i * interval, size - roi) for i in range(count)]


def gaussian_weights(roi: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """MONAI's gaussian importance map (sigma 0.125 x window), floored at its smallest value."""
    w = torch.ones((), device=device)
    for r in roi:
        x = torch.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=torch.float32, device=device)
        w = w.unsqueeze(-1) * torch.exp(x**2 / (-2 * (0.125 * r) ** 2))
    return w.clamp(min=max(float(w.min()), 1e-3))


def stream_probabilities(
    predict: Predictor,
    image: torch.Tensor,
    roi: Sequence[int],
    num_classes: int,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    store_dtype: torch.dtype = torch.float16,
    accumulate_on: torch.device | None = None,
    progress: bool = False,
    region: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax probabilities `(K, X, Y, Z)` (on the CPU) of a 3D model over image `(C, X, Y, Z)`.

    Args:
        predict: Maps windows `(b, C, *roi)` to logits `(b, K, *roi)`.
        image: The model-space volume, on the model's device.
        roi: Window size.
        num_classes: K.
        sw_batch_size: Windows per call of `predict`.
        overlap: Window overlap fraction.
        store_dtype: Precision the finished probabilities are kept in.
        accumulate_on: Device of the one-window-deep accumulator (default: the image's).
        progress: Show a progress bar.
        region: Boolean `(X, Y, Z)`: only the windows that hold some of it run (`window_runs`);
            voxels no window covers are background. None: every window.
    """
    # stream along the longest axis (the last on ties): the accumulator spans the other two
    extents = [s - r for s, r in zip(image.shape[1:], roi)]
    axis = 2 if extents[2] >= max(extents) else int(np.argmax(extents))
    if axis != 2:
        order = [a for a in range(3) if a != axis] + [axis]
        back = [order.index(a) for a in range(3)]

        def predict_moved(x: torch.Tensor) -> torch.Tensor:  # the model sees the original axes
            logits = predict(x.permute(0, 1, *[2 + b for b in back]))
            return logits.permute(0, 1, *[2 + a for a in order])

        moved = stream_probabilities(
            predict_moved, image.permute(0, *[1 + a for a in order]), [roi[a] for a in order], num_classes,
            sw_batch_size, overlap, store_dtype, accumulate_on, progress,
            None if region is None else region.permute(*order),
        )
        return moved.permute(0, *[1 + b for b in back])
    roi = tuple(int(r) for r in roi)
    size = tuple(image.shape[1:])
    image, pads = _pad_to_window(image, roi)
    padded = tuple(image.shape[1:])
    acc_device = accumulate_on or image.device
    weights = gaussian_weights(roi, acc_device)
    starts = [window_starts(s, r, overlap) for s, r in zip(padded, roi)]
    runs = window_runs(size, roi, overlap, region)
    out = torch.empty(num_classes, *size, dtype=store_dtype)
    depth = roi[2]
    # the exact path accumulates in fp32; the default one in fp16 (sums of <= 8 weighted
    # logits: ~1e-3 relative error, far below bf16 inference's own)
    acc_dtype = torch.float32 if store_dtype == torch.float32 else torch.float16
    acc = torch.zeros(num_classes, padded[0], padded[1], depth, device=acc_device, dtype=acc_dtype)
    wsum = torch.zeros(padded[0], padded[1], depth, device=acc_device)
    acc_weights = weights.to(acc_dtype)
    rows = starts[2]
    bar = tqdm(total=int(runs.sum()), desc="windows", unit="win", disable=not progress)
    # every window allocates the same activations: keep them in the heap from one window to
    # the next (the output and accumulators above stay outside, mapped on their own)
    with reuse_large_blocks():
        for r, z in enumerate(rows):
            windows = [(x, y) for i, x in enumerate(starts[0]) for j, y in enumerate(starts[1]) if runs[i, j, r]]
            for b in range(0, len(windows), sw_batch_size):
                batch = windows[b : b + sw_batch_size]
                x_in = torch.stack([image[:, x : x + roi[0], y : y + roi[1], z : z + depth] for x, y in batch])
                logits = predict(x_in).to(acc_device, acc_dtype)
                for (x, y), lg in zip(batch, logits):
                    acc[:, x : x + roi[0], y : y + roi[1]].addcmul_(lg, acc_weights)
                    wsum[x : x + roi[0], y : y + roi[1]].add_(weights)
                bar.update(len(batch))
            done = (rows[r + 1] - z) if r + 1 < len(rows) else depth
            _finish(acc[..., :done], wsum[..., :done], out, z, pads)
            if r + 1 < len(rows):  # slide the accumulator to the next row's start
                _slide(acc, done)
                _slide(wsum, done)
    bar.close()
    return out


def window_runs(size: Sequence[int], roi: Sequence[int], overlap: float, region: torch.Tensor | None = None) -> np.ndarray:
    """Which of the sliding windows over a volume of `size` run: a boolean per window position
    `(len(starts x), len(starts y), len(starts z))`, True where the window holds some of
    `region` (every window when `region` is None). Positions are MONAI's, over the volume
    zero-padded to the window as `stream_probabilities` pads it."""
    pads = _pads(size, roi)
    padded = [s + a + b for s, (a, b) in zip(size, pads)]
    starts = [window_starts(s, r, overlap) for s, r in zip(padded, roi)]
    if region is None:
        return np.ones([len(s) for s in starts], dtype=bool)
    if tuple(region.shape) != tuple(size):
        raise ValueError(f"region {tuple(region.shape)} does not match the volume {tuple(size)}")
    # windows of the padded volume, in the unpadded volume's coordinates
    spans = [[(max(0, st - a), max(0, min(n, st - a + r))) for st in ss] for ss, (a, _), r, n in zip(starts, pads, roi, size)]
    out = np.zeros([len(s) for s in starts], dtype=bool)
    for i, (x0, x1) in enumerate(spans[0]):
        for j, (y0, y1) in enumerate(spans[1]):
            for k, (z0, z1) in enumerate(spans[2]):
                out[i, j, k] = bool(region[x0:x1, y0:y1, z0:z1].any())
    return out


def _pad_to_window(x: torch.Tensor, roi: Sequence[int]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Zero-pad the trailing spatial axes of `x` that are shorter than the window, symmetrically
    as MONAI does; the padded tensor and the (before, after) padding per axis."""
    pads = _pads(x.shape[x.ndim - len(roi) :], roi)
    if any(p for pair in pads for p in pair):
        x = F.pad(x, [p for pair in reversed(pads) for p in pair])
    return x, pads


def _pads(size: Sequence[int], roi: Sequence[int]) -> list[tuple[int, int]]:
    """MONAI's symmetric zero padding of axes shorter than the window: (before, after) per axis."""
    return [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, size)]


def _slide(buf: torch.Tensor, done: int) -> None:
    """Move the unfinished planes `done:` of the last axis to the front and zero the rest."""
    keep = buf.shape[-1] - done
    tail = buf[..., done:]
    # with overlap <= 0.5 the planes kept and their new place do not overlap: no copy needed
    buf[..., :keep] = tail.clone() if keep > done else tail
    buf[..., keep:] = 0


def accumulator_device(image: torch.Tensor, num_classes: int, roi: Sequence[int]) -> torch.device:
    """Where to stitch: on the GPU when the accumulator fits in a quarter of its free memory,
    else on the CPU (MONAI's `sw_device` / `device` split)."""
    if image.device.type != "cuda":
        return image.device
    need = 4 * (num_classes + 1) * image.shape[1] * image.shape[2] * int(roi[-1])
    free, _ = torch.cuda.mem_get_info(image.device)
    return image.device if need < free // 4 else torch.device("cpu")


def stream_slice_probabilities(
    predict: Predictor,
    image: torch.Tensor,
    roi: Sequence[int],
    num_classes: int,
    slices: SliceSpec,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    store_dtype: torch.dtype = torch.float16,
    progress: bool = False,
    slice_batch: int = 16,
) -> torch.Tensor:
    """Softmax probabilities `(K, X, Y, Z)` of a 2D model run slice by slice (see `slicing`).

    Each batch of `slice_batch` slab-stacked slices is stitched in plane as MONAI's
    `sliding_window_inference` (gaussian) would stitch it (`slice_windows`).
    """
    out = torch.empty(num_classes, *image.shape[1:], dtype=store_dtype)
    depth = image.shape[1 + slices.axis]
    bar = tqdm(total=depth, desc="slices", unit="slice", disable=not progress)
    with reuse_large_blocks():  # as in `stream_probabilities`
        for start in range(0, depth, slice_batch):
            index = torch.arange(start, min(start + slice_batch, depth), device=image.device)
            prob = slice_windows(predict, slab_stack(image, slices, index), roi, num_classes, sw_batch_size, overlap)
            out.narrow(1 + slices.axis, start, len(index)).copy_(prob.to("cpu", store_dtype).movedim(0, slices.axis + 1))
            bar.update(len(index))
    bar.close()
    return out


def slice_windows(
    predict: Predictor,
    planes: torch.Tensor,
    roi: Sequence[int],
    num_classes: int,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
) -> torch.Tensor:
    """Softmax probabilities `(S, K, H, W)` of a 2D model over planes `(S, C, H, W)`.

    MONAI's `sliding_window_inference` with gaussian blending, without importing MONAI:
    its window positions and zero padding of planes smaller than the window, and its
    gaussian map; the logits are accumulated in fp32. Each window position runs over all
    planes, `sw_batch_size` at a time.
    """
    roi = tuple(int(r) for r in roi)
    size = tuple(planes.shape[2:])
    planes, pads = _pad_to_window(planes, roi)
    padded = planes.shape[2:]
    weights = gaussian_weights(roi, planes.device)
    acc = torch.zeros(planes.shape[0], num_classes, *padded, device=planes.device)
    wsum = torch.zeros(*padded, device=planes.device)
    for x in window_starts(padded[0], roi[0], overlap):
        for y in window_starts(padded[1], roi[1], overlap):
            window = planes[..., x : x + roi[0], y : y + roi[1]]
            for b in range(0, planes.shape[0], sw_batch_size):
                logits = predict(window[b : b + sw_batch_size]).float()
                acc[b : b + sw_batch_size, :, x : x + roi[0], y : y + roi[1]].addcmul_(logits, weights)
            wsum[x : x + roi[0], y : y + roi[1]].add_(weights)
    (x0, _), (y0, _) = pads
    inside = (slice(x0, x0 + size[0]), slice(y0, y0 + size[1]))
    return torch.softmax(acc[(..., *inside)] / wsum[inside], dim=1)


def _finish(
    acc: torch.Tensor, wsum: torch.Tensor, out: torch.Tensor, z: int, pads: list[tuple[int, int]], chunk: int = 8
) -> None:
    """Normalise finished planes, softmax them and store the part inside the unpadded volume
    (a few planes at a time, so the float32 temporaries stay small)."""
    (x0, _), (y0, _), (z0, _) = pads
    sx, sy = out.shape[1], out.shape[2]
    for c0 in range(0, acc.shape[-1], chunk):
        c1 = min(c0 + chunk, acc.shape[-1])
        lo, hi = max(z + c0 - z0, 0), min(z + c1 - z0, out.shape[-1])  # unpadded planes
        if hi <= lo:
            continue
        a, b = lo - (z - z0), hi - (z - z0)  # the same planes in the accumulator
        w = wsum[x0 : x0 + sx, y0 : y0 + sy, a:b]
        prob = torch.softmax(acc[:, x0 : x0 + sx, y0 : y0 + sy, a:b].float() / w, dim=0)
        empty = w == 0  # no window ran here (`region`): background
        if empty.any():
            prob[:, empty] = 0.0
            prob[0, empty] = 1.0
        out[..., lo:hi] = prob.to(out.dtype)


def _plane_cost(voxel_to_model: np.ndarray, shape: Sequence[int]) -> int:
    """Voxels one scan plane costs: its own, or the model-space block it reads when the model
    grid is finer than the scan's (then the float32 block read dominates)."""
    return int(shape[0] * shape[1] * max(1.0, abs(float(np.linalg.det(voxel_to_model[:3, :3])))))


@dataclass
class Placed:
    """Probabilities computed over a box of the model grid; background (class 0) everywhere else.

    Attributes:
        prob: `(K, *box size)` probabilities inside the box.
        box: The box, one slice per axis of the model grid.
        shape: The whole model grid.
    """

    prob: torch.Tensor
    box: tuple[slice, slice, slice]
    shape: tuple[int, int, int]


def _prob_box(prob: torch.Tensor | Placed) -> tuple[Callable[[Sequence[int], Sequence[int]], torch.Tensor], tuple]:
    """The block reader `sample_slab` takes, and the model grid's shape."""
    if isinstance(prob, torch.Tensor):
        def box(lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
            return prob[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].float()

        return box, tuple(prob.shape[1:])
    start = [s.start for s in prob.box]

    def placed_box(lo: Sequence[int], hi: Sequence[int]) -> torch.Tensor:
        block = torch.zeros(prob.prob.shape[0], *(h - l for l, h in zip(lo, hi)))
        block[0] = 1.0  # background outside the box
        a = [max(l, s) for l, s in zip(lo, start)]
        b = [min(h, s + n) for h, s, n in zip(hi, start, prob.prob.shape[1:])]
        if all(x < y for x, y in zip(a, b)):
            block[:, a[0] - lo[0] : b[0] - lo[0], a[1] - lo[1] : b[1] - lo[1], a[2] - lo[2] : b[2] - lo[2]] = prob.prob[
                :, a[0] - start[0] : b[0] - start[0], a[1] - start[1] : b[1] - start[1], a[2] - start[2] : b[2] - start[2]
            ].float()
        return block

    return placed_box, tuple(prob.shape)


def invert_argmax(
    prob: torch.Tensor | Placed,
    voxel_to_model: np.ndarray,
    shape: Sequence[int],
    keep: np.ndarray,
    budget_voxels: int = 1 << 20,
) -> np.ndarray:
    """Class index (into `keep`'s positions) per scan voxel, computed slab by slab.

    Args:
        prob: Model-space probabilities `(K, X, Y, Z)`, or those of a box of it (`Placed`).
        voxel_to_model: 4x4 map from scan voxel indices to model-space voxel indices.
        shape: The scan's grid.
        keep: Boolean per class; others never win.
        budget_voxels: Scan voxels per slab (bounds the float32 working set).
    """
    kept = torch.from_numpy(np.flatnonzero(keep))
    every = len(kept) == len(keep)
    out = np.empty(tuple(shape), dtype=np.int64 if len(kept) > 255 else np.uint8)
    whole, size = _prob_box(prob)
    box = whole if every else lambda lo, hi: whole(lo, hi)[kept]  # the kept classes' probabilities
    for k0, k1 in slabs(shape[2], _plane_cost(voxel_to_model, shape), budget_voxels):
        best = sample_slab_argmax(box, size, voxel_to_model, shape, k0, k1)
        out[..., k0:k1] = (best if every else kept[best.long()]).numpy()
    return out


def invert_probabilities(prob: torch.Tensor | Placed, voxel_to_model: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Probabilities `(K, *shape)` float32 on the scan's grid (for inspection and tests)."""
    k = prob.shape[0] if isinstance(prob, torch.Tensor) else prob.prob.shape[0]
    out = torch.empty(k, *shape, dtype=torch.float32)
    box, size = _prob_box(prob)
    for k0, k1 in slabs(shape[2], _plane_cost(voxel_to_model, shape), 1 << 20):
        out[..., k0:k1] = sample_slab(box, size, voxel_to_model, shape, k0, k1)
    return out
