"""Random training crops, read from a cached case on disk or from arrays in memory.

The crop centres are MONAI's: `generate_label_classes_crop_centers` (every class its share of
the crops, as RandCropByLabelClassesd) or `generate_pos_neg_label_crop_centers`
(RandCropByPosNegLabeld), drawn from the indices `case_cache.centre_groups` keeps, on the
volume zero-padded symmetrically to at least the crop (MONAI's SpatialPadd). Only the crops
are read: from a `CachedCase` through a memory map opened for this call and closed after,
so neither a process nor its page tables keep the volume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from monai.transforms.utils import generate_label_classes_crop_centers, generate_pos_neg_label_crop_centers

from medvit.pipelines.case_cache import CachedCase, centre_groups, read_box

__all__ = ["SampleCropsd"]


class SampleCropsd(Randomizable, Transform):
    """`num_samples` crops of `size` from `{"case": CachedCase}` or `{"image", "label"}` arrays.

    Args:
        size: Crop size (x, y, z).
        num_classes: Classes including background.
        num_samples: Crops per call.
        ratios: Per-class shares of the crops (`classes` sampling); None: pos-neg sampling.
        pos_fraction: Share of crops centred on a labelled voxel (pos-neg sampling).

    Returns a list of `{"image": (C, *size) float32, "label": (1, *size) float32}` tensors.
    """

    def __init__(
        self, size: Sequence[int], num_classes: int, num_samples: int, ratios: Sequence[float] | None = None,
        pos_fraction: float = 0.5,
    ) -> None:
        self.size = [int(s) for s in size]
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.ratios = None if ratios is None else [float(r) for r in ratios]
        self.pos_fraction = float(pos_fraction)

    def randomize(self, data: Any = None) -> None:
        pass

    def __call__(self, data: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        case = data.get("case")
        if isinstance(case, CachedCase):
            image, label = case.arrays(mmap=True)
            group = case.centres
        else:
            image = np.asarray(data["image"], dtype=np.float32)
            label = np.asarray(data["label"])[0]
            groups = centre_groups(label, image[0], self.num_classes, np.random.default_rng(self.R.randint(2**31)))
            group = groups.__getitem__
        shape = label.shape
        padded = [max(s, c) for s, c in zip(shape, self.size)]
        before = [(p - s) // 2 for p, s in zip(padded, shape)]

        def shifted(indices: np.ndarray) -> np.ndarray:  # flat indices of the padded volume
            if not any(before) or indices.size == 0:
                return indices
            coords = np.unravel_index(indices, shape)
            return np.ravel_multi_index(tuple(c + b for c, b in zip(coords, before)), padded)

        if self.ratios is not None:
            indices = [shifted(group(f"class{k}")) for k in range(self.num_classes)]
            centres = generate_label_classes_crop_centers(
                self.size, self.num_samples, padded, indices, self.ratios, self.R, warn=False
            )
        else:
            centres = generate_pos_neg_label_crop_centers(
                self.size, self.num_samples, self.pos_fraction, padded, shifted(group("fg")), shifted(group("bg")),
                self.R,
            )
        out = []
        for centre in centres:
            start = [int(c) - s // 2 - b for c, s, b in zip(centre, self.size, before)]
            out.append({
                "image": torch.from_numpy(read_box(image, start, self.size)),
                "label": torch.from_numpy(read_box(label, start, self.size)[None].astype(np.float32)),
            })
        del image, label  # closes the memory maps
        return out
