"""MONAI dictionary transforms: loading, orientation, spacing, intensity (augmentation: `augment`).

Spatial steps (orientation to RAS, resampling to the target spacing, foreground crop)
are MONAI invertible transforms. Training and preprocessing use them; `segment` computes
the same model-space grid and values without importing MONAI (`geometry`, `intensity`,
tested equal to these transforms) and maps predictions back through that grid's affine.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from medvit.pipelines.io import Scan, read_scan
from medvit.pipelines.preprocessing import Preprocessing
from medvit.pipelines.slicing import SliceSpec, slab_stack


def scan_to_tensor(scan: Scan, dtype: torch.dtype = torch.float32) -> MetaTensor:
    """A channel-first MetaTensor carrying the scan's RAS affine and file name."""
    data = torch.from_numpy(np.ascontiguousarray(scan.array)).to(dtype)[None]
    affine = torch.as_tensor(scan.affine, dtype=torch.float64)
    meta = {
        "filename_or_obj": str(scan.path),
        "original_affine": affine.clone(),
        "spatial_shape": np.asarray(scan.shape),
        "original_channel_dim": "no_channel",
    }
    return MetaTensor(data, affine=affine, meta=meta)


class LoadScand(MapTransform):
    """Read the files under `keys` with `medvit.pipelines.io.read_scan` (any format)."""

    def __init__(self, keys: Sequence[Hashable], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                continue
            d[key] = scan_to_tensor(d[key] if isinstance(d[key], Scan) else read_scan(d[key]))
        return d


class RemapLabelsd(MapTransform):
    """Map label ids to contiguous class indices; ids not listed become background (0)."""

    def __init__(self, keys: Sequence[Hashable], label_ids: Sequence[int]) -> None:
        super().__init__(keys)
        self.label_ids = [int(i) for i in label_ids]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            out = torch.zeros_like(lab)
            for cls, lid in enumerate(self.label_ids, start=1):
                out[lab == lid] = cls
            d[key] = out
        return d


def intensity_transform(prep: Preprocessing, key: str = "image") -> MapTransform | None:
    if prep.intensity == "ct":
        lo, hi = prep.ct_window
        return ScaleIntensityRanged(key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if prep.intensity == "ct-fingerprint":
        # clip, then z-score: one linear map of the clipped range (intensity.scale_intensity)
        lo, hi, mean, std = prep.ct_norm()
        return ScaleIntensityRanged(key, a_min=lo, a_max=hi, b_min=(lo - mean) / std, b_max=(hi - mean) / std, clip=True)
    if prep.intensity == "mr":
        return NormalizeIntensityd(key, nonzero=True, channel_wise=True)
    return None


def preprocess_transforms(
    prep: Preprocessing,
    keys: Sequence[str] = ("image",),
    label_ids: Sequence[int] | None = None,
    crop_foreground: bool = False,
) -> Compose:
    """Load, reorient, resample and normalise; labels (key `label`) use nearest neighbour.

    Args:
        prep: Target orientation, spacing and intensity preset.
        keys: `image` and optionally `label`.
        label_ids: Label ids kept as classes 1..K (others become background).
        crop_foreground: Crop to the body (image above its minimum), for training.
    """
    keys = list(keys)
    modes = ["nearest" if k == "label" else "bilinear" for k in keys]
    steps: list[Any] = [LoadScand(keys)]
    if "label" in keys and label_ids is not None:
        steps.append(RemapLabelsd("label", label_ids))
    steps.append(Orientationd(keys, axcodes=prep.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if prep.spacing is not None:
        steps.append(Spacingd(keys, pixdim=prep.spacing, mode=modes, dtype=torch.float32))
    norm = intensity_transform(prep)
    if norm is not None:
        steps.append(norm)
    if crop_foreground:
        steps.append(CropForegroundd(keys, source_key="image", select_fn=_body, margin=2, allow_smaller=True))
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=True))
    return Compose(steps)


def _body(x: torch.Tensor) -> torch.Tensor:
    return x > x.min()


class SlabToChannelsd(MapTransform):
    """Turn a thin 3D crop into a 2D training sample.

    The image `(C, X, Y, Z)` with `slab` slices along `axis` becomes `(slab * C, *plane)`,
    stacked as inference stacks slabs (`medvit.pipelines.slicing.slab_stack`); the label
    becomes its centre slice `(1, *plane)`.
    """

    def __init__(self, axis: int, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__([image_key, label_key])
        self.axis, self.image_key, self.label_key = axis, image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = torch.as_tensor(d[self.image_key])
        slab = img.shape[1 + self.axis]
        centre = torch.tensor([slab // 2])
        d[self.image_key] = slab_stack(img, SliceSpec(self.axis, slab), centre)[0].contiguous()
        lab = torch.as_tensor(d[self.label_key])
        d[self.label_key] = lab.select(1 + self.axis, slab // 2).contiguous()
        return d
