"""Unlabelled scans for self-supervised pretraining: volumes in model space and random views.

Each scan (NIfTI, NRRD, MetaImage, a DICOM series folder) is read, resampled to the run's
spacing in RAS and scaled with the CT window, as `medvit segment` prepares a scan
(`geometry`, `intensity`, no MONAI), and kept in memory. A sample is a random region of a
volume (twice the crop along each axis; for 2D encoders, of a random axial slice) from
which the views are cropped at random sizes (2D images, PNG / JPEG / BMP / TIFF files or
folders of them, are read as one grey channel in 0..1 at the region's size), resized to the view size, mirrored and
jittered in intensity (MONAI transforms): global views (MoCo v3 and SiT take two) cover
half to all of the region along each axis, DINO's local views a fifth to a half.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandFlip,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSpatialCrop,
    Resize,
    SpatialPad,
)
from torch.utils.data import Dataset

from medvit.pipelines.classify_load import IMAGE_SUFFIXES, load_item
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.geometry import model_grid, resample_scan
from medvit.pipelines.intensity import scale_intensity
from medvit.pipelines.io import find_scans, read_scan
from medvit.pipelines.preprocessing import Preprocessing

REGION = 2.0  # the region a sample's views come from, in crops
GLOBAL_SCALE = (0.5, 1.0)  # view side / region side
LOCAL_SCALE = (0.2, 0.5)


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """The 2D image files (PNG, JPEG, BMP, TIFF) among `paths` and directly inside its folders."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.append(path)
        elif path.is_dir():
            found += sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                            and not f.name.startswith("."))  # fmt: skip
    return found


def load_images(paths: Sequence[Path], size: Sequence[int]) -> list[tuple[Path, torch.Tensor]]:
    """2D images as `(path, (1, H, W) float32)` in 0..1 at `size` (one channel, luminance;
    `classify_load`'s reading and intensity rules).

    Raises:
        MedvitError: An image cannot be read (one line naming it).
    """
    return [(p, load_item(p, "image", size, in_chans=1)) for p in paths]


def load_volumes(paths: Sequence[str | Path], prep: Preprocessing) -> list[tuple[Path, torch.Tensor]]:
    """Every scan under `paths` in model space: `(path, (1, X, Y, Z) float32)`.

    Raises:
        ScanError: A path is missing or not a scan (one line naming it).
        MedvitError: A scan is empty on the model grid.
    """
    out = []
    for path in find_scans(paths):
        scan = read_scan(path)
        affine, shape = model_grid(scan.affine, scan.shape, prep.spacing, prep.orientation)
        if any(s < 1 for s in shape):
            raise MedvitError.at(path, "empty after resampling")
        vol = resample_scan(scan.array, affine, scan.affine, shape)
        out.append((path, scale_intensity(vol, prep.intensity, prep.ct_window)))
    if not out:
        raise MedvitError(f"{', '.join(map(str, paths))}: no scans to pretrain on")
    return out


@dataclass(frozen=True)
class ViewSpec:
    """Views of one sample: `count` views of `size`, their sides `scale` x the region's."""

    count: int
    size: tuple[int, ...]
    scale: tuple[float, float]


def view_transform(spec: ViewSpec, region: Sequence[int]) -> Compose:
    """Random-size crop of the region, resized to the view, mirrored, intensity-jittered."""
    dims = len(spec.size)
    lo = [max(1, int(r * spec.scale[0])) for r in region]
    hi = [max(a, int(r * spec.scale[1])) for a, r in zip(lo, region)]
    return Compose([
        RandSpatialCrop(roi_size=lo, max_roi_size=hi, random_size=True, random_center=True),
        Resize(spatial_size=spec.size, mode="trilinear" if dims == 3 else "bilinear"),
        *[RandFlip(prob=0.5, spatial_axis=a) for a in range(dims)],
        RandScaleIntensity(factors=0.1, prob=0.8),
        RandShiftIntensity(offsets=0.1, prob=0.8),
        RandGaussianNoise(prob=0.2, std=0.02),
    ])  # fmt: skip


class ViewDataset(Dataset):
    """Views of random regions of in-memory volumes or images; item `i` is from volume `i % n`.

    Args:
        volumes: `(1, X, Y, Z)` model-space volumes, or `(1, H, W)` images for 2D views.
        crop: Global view size (2 entries: 2D views of axial slices).
        views: The views of a sample, global first.
        samples_per_volume: Samples per volume and epoch.
    """

    def __init__(self, volumes: Sequence[torch.Tensor], crop: Sequence[int], views: Sequence[ViewSpec],
                 samples_per_volume: int = 1) -> None:  # fmt: skip
        self.volumes = list(volumes)
        self.dims = len(crop)
        self.region = [max(1, round(REGION * c)) for c in crop]
        self.samples = samples_per_volume
        self.pad = SpatialPad(self.region)
        self.region_crop = RandSpatialCrop(self.region, random_size=False)
        self.views = [(spec, view_transform(spec, self.region)) for spec in views]
        self.rng = np.random.default_rng(0)

    def set_random_state(self, seed: int) -> None:
        """Seed every random choice (slice, region, views) for one epoch."""
        self.rng = np.random.default_rng(seed)
        self.region_crop.set_random_state(seed=seed)
        for i, (_, tf) in enumerate(self.views):
            tf.set_random_state(seed=seed + 1 + i)

    def __len__(self) -> int:
        return len(self.volumes) * self.samples

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        vol = self.volumes[index % len(self.volumes)]
        if vol.ndim == self.dims + 2:  # a volume, 2D views: one of its axial slices
            vol = vol[..., int(self.rng.integers(vol.shape[-1]))]
        region = self.region_crop(self.pad(vol))
        out = []
        for spec, tf in self.views:
            for _ in range(spec.count):
                v = tf(region)
                out.append(torch.as_tensor(v.as_tensor() if hasattr(v, "as_tensor") else v, dtype=torch.float32))
        return out
