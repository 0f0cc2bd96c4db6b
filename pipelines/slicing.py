"""Slicing volumes for 2D models, shared by inference (`stitch`) and training (`transforms`).

A 2D model runs slice by slice along one axis of the model-space volume: each slice, with
`slab - 1` neighbours stacked as channels (edge slices repeated at the borders), is a batch
item of a 2D sliding window, and the per-slice results are stacked back into a volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
