"""The intensity presets of `Preprocessing` on a model-space volume, without importing MONAI.

`segment` scales a scan here; training and dataset preprocessing use MONAI's transforms
(`transforms.intensity_transform`), and the two are tested equal
(`tests/pipelines/test_geometry.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["scale_intensity"]


def scale_intensity(
    x: torch.Tensor, preset: str, ct_window: Sequence[float], ct_norm: Sequence[float] | None = None
) -> torch.Tensor:
    """The intensity presets of `Preprocessing`, in place: MONAI's ScaleIntensityRange (clip)
    for `ct`, clipping to `ct_norm`'s (low, high) and z-scoring with its (mean, std) for
    `ct-fingerprint`, NormalizeIntensity over the non-zero voxels for `mr`."""
    if preset == "ct":
        lo, hi = ct_window
        return x.sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)
    if preset == "ct-fingerprint":
        if ct_norm is None:
            raise ValueError("the ct-fingerprint preset needs its (low, high, mean, std)")
        lo, hi, mean, std = ct_norm
        return x.clamp_(lo, hi).sub_(mean).div_(std)
    if preset == "mr":
        for c in x:
            nz = c[c != 0]
            if nz.numel():
                mean, std = nz.mean(), nz.std(correction=0)
                c[c != 0] = (nz - mean) / (std if std > 0 else 1.0)
        return x
    return x
