"""Dataset fingerprint: geometry, foreground intensities and label sizes of a dataset.

The fingerprint follows nnU-Net (Isensee et al., "nnU-Net: a self-configuring method for
deep learning-based biomedical image segmentation", Nature Methods 2021); its
``suggested`` entry is :func:`medvit.pipelines.planning.plan_from_fingerprint`.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np

from medvit.pipelines.datasets import Case, DatasetSpec, read_case
from medvit.pipelines.errors import DatasetError
from medvit.pipelines.io import Scan
from medvit.pipelines.planning import plan_from_fingerprint

__all__ = ["FINGERPRINT_JSON", "compute_fingerprint"]

FINGERPRINT_JSON = "fingerprint.json"

# Foreground voxels sampled per case for the intensity statistics: enough for stable
# percentiles, little enough that a large dataset's samples fit in memory.
FOREGROUND_SAMPLES_PER_CASE = 10_000


def _ras_order(scan: Scan) -> tuple[list[float], list[int]]:
    """Spacing and shape along RAS axes x, y, z (the order after reorientation to RAS)."""
    ornt = nib.io_orientation(scan.affine)
    spacing, shape = [0.0] * 3, [0] * 3
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        spacing[int(world_axis)] = float(scan.spacing[voxel_axis])
        shape[int(world_axis)] = int(scan.shape[voxel_axis])
    return spacing, shape


def _pick_cases(cases: list[Case], max_cases: int | None) -> list[Case]:
    if max_cases is None or max_cases >= len(cases):
        return list(cases)
    if max_cases < 1:
        raise DatasetError(f"max_cases must be at least 1, got {max_cases}")
    # Spread over the list: datasets are often sorted by site or scanner.
    index = np.unique(np.round(np.linspace(0, len(cases) - 1, max_cases)).astype(int))
    return [cases[i] for i in index]


def compute_fingerprint(spec: DatasetSpec, max_cases: int | None = None) -> dict:
    """Measure a dataset: geometry, foreground intensities and label sizes.

    Spacings and shapes are given along the RAS axes x, y, z, the axis order the
    volumes have after reorientation to RAS (so they compare directly with
    ``Preprocessing.spacing``); ``orientations`` keeps each file's own axis codes.
    Intensity statistics pool up to 10,000 foreground voxels per case, drawn with a
    fixed seed; foreground is any voxel holding one of the dataset's labels. Label ids
    are string keys, so the dict is unchanged by a JSON round trip.

    Args:
        spec: The dataset.
        max_cases: Measure at most this many cases, spread evenly over the list.

    Returns:
        ``num_cases``, ``modality``, ``spacings``, ``shapes``, ``orientations``,
        ``median_spacing``, ``median_shape``, ``intensity`` (``mean``, ``std``, ``min``,
        ``max``, ``median``, ``percentile_00_5``, ``percentile_99_5``, ``num_samples``;
        None values without foreground), ``label_voxels`` (id -> voxels over all
        cases), ``label_volume_ml`` (id -> ml over all cases), ``label_volume_ml_mean``
        (id -> ml per case), ``labels`` (id -> name) and ``suggested``
        (:func:`plan_from_fingerprint`).

    Raises:
        DatasetError: A file cannot be read, or a label does not fit its image.
    """
    cases = _pick_cases(spec.cases, max_cases)
    if not cases:
        raise DatasetError.at(spec.root, "no training cases")
    rng = np.random.default_rng(0)
    spacings, shapes, orientations, samples = [], [], [], []
    voxels = {lid: 0 for lid in spec.label_ids}
    volume = {lid: 0.0 for lid in spec.label_ids}
    # In a remapped (preprocessed) dataset, original id label_ids[c - 1] is stored as c.
    stored = {lid: (c if spec.remapped else lid) for c, lid in enumerate(spec.label_ids, start=1)}
    for case in cases:
        image, label = read_case(case)
        spacing, shape = _ras_order(image)
        spacings.append(spacing)
        shapes.append(shape)
        orientations.append(image.orientation())
        voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0
        lab = label.array
        foreground = np.zeros(lab.shape, dtype=bool)
        for lid, value in stored.items():
            mask = lab == value
            count = int(np.count_nonzero(mask))
            voxels[lid] += count
            volume[lid] += count * voxel_ml
            foreground |= mask
        values = image.array[foreground]
        if values.size > FOREGROUND_SAMPLES_PER_CASE:
            values = rng.choice(values, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float64))
    pooled = np.concatenate(samples)
    fp: dict[str, Any] = {
        "num_cases": len(cases),
        "modality": spec.modality,
        "spacings": spacings,
        "shapes": shapes,
        "orientations": orientations,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings), axis=0)],
        "median_shape": [float(v) for v in np.median(np.asarray(shapes), axis=0)],
        "intensity": _intensity_stats(pooled),
        "label_voxels": {str(k): v for k, v in voxels.items()},
        "label_volume_ml": {str(k): round(v, 3) for k, v in volume.items()},
        "label_volume_ml_mean": {str(k): round(v / len(cases), 3) for k, v in volume.items()},
        "labels": {str(k): v for k, v in spec.labels.items()},
    }
    fp["suggested"] = plan_from_fingerprint(fp)
    return fp


def _intensity_stats(values: np.ndarray) -> dict[str, float | int | None]:
    keys = ("mean", "std", "min", "max", "median", "percentile_00_5", "percentile_99_5")
    if values.size == 0:
        return {**{k: None for k in keys}, "num_samples": 0}
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "median": float(p50),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
        "num_samples": int(values.size),
    }
