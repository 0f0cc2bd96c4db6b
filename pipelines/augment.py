"""Training transforms built from a `Recipe`: crop sampling, mirroring, spatial and intensity
augmentation, all MONAI dictionary transforms.

Order: sample crops of the enlarged size (`crop_sampling`: from a cached case on disk, or
from arrays, padded to the crop as MONAI's SpatialPadd would), mirror; 2D models then turn each thin crop
into slab channels, so the spatial and intensity steps below act in the slice plane only;
rotation + scaling (and optional elastic deformation) and a centre crop back to the patch
size; then noise, blur, brightness, contrast, low resolution and gamma, in nnU-Net's order.
Images are resampled bilinearly, labels with nearest neighbour, so they stay aligned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    Rand2DElasticd,
    Rand3DElasticd,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
)

from medvit.pipelines.crop_sampling import SampleCropsd
from medvit.pipelines.recipes import Recipe, enlarged, mirror_axes
from medvit.pipelines.slicing import in_plane
from medvit.pipelines.transforms import SlabToChannelsd

KEYS = ["image", "label"]


def train_transforms(
    recipe: Recipe,
    patch_size: Sequence[int],
    num_classes: int,
    num_samples: int = 2,
    slice_axis: int | None = None,
    label_names: Sequence[str] = (),
    orientation: str = "RAS",
) -> Compose:
    """Random training crops of `patch_size`, augmented as `recipe` says.

    Args:
        recipe: Augmentation strengths and crop sampling.
        patch_size: Crop size (x, y, z); for 2D models the entry along `slice_axis` is the slab.
        num_classes: Classes including background (labels hold 0..num_classes - 1).
        num_samples: Crops per volume and pass.
        slice_axis: For 2D models, the axis the slices are taken along; each crop ends as
            `(slab * C, *plane)` with its centre slice's label `(1, *plane)`.
        label_names: Class names; lateralised names stop left-right mirroring (`lr-safe`).
        orientation: Axis codes of the volumes (where the left-right axis is).
    """
    aug_axes = [a for a in range(3) if a != slice_axis]
    spatial = recipe.affine_prob > 0 or recipe.elastic_prob > 0
    crop = enlarged(patch_size, recipe.margin, aug_axes) if spatial else [int(p) for p in patch_size]
    steps: list[Any] = [_sampler(recipe, crop, num_classes, num_samples)]
    steps += [RandFlipd(KEYS, prob=recipe.mirror_prob, spatial_axis=a) for a in mirror_axes(recipe, label_names, orientation)]
    out_size = [int(p) for p in patch_size]
    if slice_axis is not None:
        steps.append(SlabToChannelsd(slice_axis))
        crop, out_size = list(in_plane(crop, slice_axis)), list(in_plane(out_size, slice_axis))
    steps += _spatial(recipe, len(out_size))
    if crop != out_size:
        steps.append(CenterSpatialCropd(KEYS, roi_size=out_size))
    steps += _intensity(recipe, len(out_size))
    return Compose(steps)


def _sampler(recipe: Recipe, crop: Sequence[int], num_classes: int, num_samples: int) -> SampleCropsd:
    if recipe.sampler == "posneg":
        return SampleCropsd(crop, num_classes, num_samples, pos_fraction=recipe.fg_fraction)
    # Each foreground class gets the same share of the foreground crops, however small it
    # is; background centres come from the whole (uncropped) scan, so crops also show
    # anatomy without any labelled organ.
    fg = num_classes - 1
    ratios = [1.0 - recipe.fg_fraction] + [recipe.fg_fraction / max(fg, 1)] * fg
    return SampleCropsd(crop, num_classes, num_samples, ratios=ratios)


def _spatial(recipe: Recipe, dims: int) -> list[Any]:
    steps: list[Any] = []
    modes = ["bilinear", "nearest"]
    if recipe.affine_prob > 0:
        angle = float(np.deg2rad(recipe.rotate_deg))
        zoom = (recipe.zoom[0] - 1.0, recipe.zoom[1] - 1.0)  # MONAI adds 1 to the drawn factor
        steps.append(RandAffined(
            KEYS, prob=recipe.affine_prob, rotate_range=[angle] * (3 if dims == 3 else 1),
            scale_range=[zoom] * dims, mode=modes, padding_mode="border",
        ))
    if recipe.elastic_prob > 0:
        if dims == 3:
            steps.append(Rand3DElasticd(
                KEYS, sigma_range=(5.0, 8.0), magnitude_range=(100.0, 200.0), prob=recipe.elastic_prob,
                mode=modes, padding_mode="border",
            ))
        else:
            steps.append(Rand2DElasticd(
                KEYS, spacing=(16, 16), magnitude_range=(1.0, 2.0), prob=recipe.elastic_prob,
                mode=modes, padding_mode="border",
            ))
    return steps


def _intensity(recipe: Recipe, dims: int) -> list[Any]:
    r = recipe
    steps: list[Any] = []
    if r.noise_prob > 0:
        steps.append(RandGaussianNoised("image", prob=r.noise_prob, std=r.noise_std))
    if r.smooth_prob > 0:
        s = r.smooth_sigma
        steps.append(RandGaussianSmoothd("image", sigma_x=s, sigma_y=s, sigma_z=s, prob=r.smooth_prob))
    if r.brightness_prob > 0:
        steps.append(RandScaleIntensityd("image", factors=r.brightness, prob=r.brightness_prob))
    if r.shift_prob > 0:
        steps.append(RandShiftIntensityd("image", offsets=r.shift, prob=r.shift_prob))
    if r.contrast_prob > 0:
        steps.append(RandScaleIntensityFixedMeand(
            "image", factors=r.contrast, fixed_mean=True, preserve_range=True, prob=r.contrast_prob
        ))
    if r.lowres_prob > 0:
        steps.append(RandSimulateLowResolutiond(
            "image", prob=r.lowres_prob, zoom_range=r.lowres_zoom,
            upsample_mode="trilinear" if dims == 3 else "bilinear",
        ))
    if r.gamma_inverted_prob > 0:
        steps.append(RandAdjustContrastd(
            "image", prob=r.gamma_inverted_prob, gamma=r.gamma, invert_image=True, retain_stats=True
        ))
    if r.gamma_prob > 0:
        steps.append(RandAdjustContrastd("image", prob=r.gamma_prob, gamma=r.gamma, retain_stats=True))
    return steps
