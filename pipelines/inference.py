"""Model-space inference shared by `segment` and training's validation.

3D models run MONAI's sliding-window inference over the volume. 2D models run slice by
slice along one axis of the model-space volume: each slice (with `slab - 1` neighbours
stacked as channels, edge slices repeated at the borders) is a batch item of a 2D sliding
window, and the per-slice logits are stacked back into a volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from medvit.pipelines.errors import MedvitError

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass(frozen=True)
class SliceSpec:
    """How a 2D model sees a volume.

    Attributes:
        axis: Model-space (RAS) axis the slices are taken across: 0 sagittal, 1 coronal,
            2 axial.
        slab: Odd number of neighbouring slices given to the model as channels.
    """

    axis: int = 2
    slab: int = 1

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise MedvitError(f"slice axis must be 0, 1 or 2 (or {', '.join(AXES)}), got {self.axis}")
        if self.slab < 1 or self.slab % 2 == 0:
            raise MedvitError(f"slab must be an odd number of slices >= 1, got {self.slab}")


def parse_axis(value: int | str) -> int:
    """`axial`/`coronal`/`sagittal` or 0/1/2."""
    if isinstance(value, str) and not value.isdigit():
        if value not in AXES:
            raise MedvitError(f"slice axis must be one of {', '.join(AXES)} or 0/1/2, got {value!r}")
        return AXES[value]
    return int(value)


def in_plane(size: Sequence[int], axis: int) -> tuple[int, ...]:
    """The two entries of a 3-vector that lie in the slice plane."""
    return tuple(int(s) for i, s in enumerate(size) if i != axis)


def slab_stack(volume: torch.Tensor, spec: SliceSpec, index: torch.Tensor) -> torch.Tensor:
    """Slices `index` of a `(C, X, Y, Z)` volume as a batch `(n, C * slab, *plane)`.

    Channel order is slice-major: (slice - h, ..., slice + h), each with all C channels.
    """
    h = spec.slab // 2
    depth = volume.shape[1 + spec.axis]
    offsets = torch.arange(-h, h + 1, device=index.device)
    picks = (index[:, None] + offsets[None]).clamp_(0, depth - 1)  # (n, slab)
    moved = volume.movedim(1 + spec.axis, 0)  # (D, C, *plane)
    out = moved[picks.flatten()]  # (n * slab, C, *plane)
    return out.reshape(len(index), spec.slab * volume.shape[0], *out.shape[2:])


def window_logits(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    slices: SliceSpec | None = None,
    slice_batch: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Logits `(1, K, X, Y, Z)` of a model-space image `(1, C, X, Y, Z)`.

    Args:
        model: 3D model, or 2D model when `slices` is given.
        image: The preprocessed volume, batch of one, on the model's device.
        roi_size: Window size (3 entries for 3D, the 2 in-plane entries for 2D).
        sw_batch_size: Windows per forward pass.
        overlap: Window overlap fraction.
        slices: How to slice the volume for a 2D model (None for 3D models).
        slice_batch: Slices per sliding-window call for 2D models.
        progress: Show a progress bar.
    """
    from monai.inferers import sliding_window_inference  # MONAI's import is heavy: only when used

    if slices is None:
        return sliding_window_inference(
            image, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=model,
            overlap=overlap, mode="gaussian", progress=progress,
        )
    vol = image[0]
    depth = vol.shape[1 + slices.axis]
    if depth < 1:
        raise MedvitError("the volume has no slices along the slice axis")
    out: torch.Tensor | None = None
    starts = range(0, depth, slice_batch)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="slices", unit="batch")
    for start in starts:
        index = torch.arange(start, min(start + slice_batch, depth), device=vol.device)
        x = slab_stack(vol, slices, index)
        y = sliding_window_inference(
            x, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=model,
            overlap=overlap, mode="gaussian",
        )
        if out is None:
            shape = list(vol.shape[1:])
            out = y.new_empty(y.shape[1], *shape)
        out.narrow(1 + slices.axis, start, len(index)).copy_(y.movedim(0, slices.axis + 1))
    return out[None]
