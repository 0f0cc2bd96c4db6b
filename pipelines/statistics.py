"""Per-label statistics of a scan: voxels, volume and intensities inside each label.

`label_statistics` reads the mask once (`scipy.ndimage.find_objects` gives each label's
bounding box) and then looks only inside each box, so a 512x512x400 scan with a hundred
labels costs one pass plus the boxes, never one full-volume comparison per label.
Intensities are the scan's own voxel values (Hounsfield units for CT: `Scan.array` is
already rescaled by the NIfTI slope or the DICOM rescale), computed in float64;
percentiles use numpy's default (linear) interpolation.

`medvit segment --statistics` writes them as `<stem>_stats.json`; `read_statistics` and
`statistics_rows` turn a folder of those into one table row per (scan, label), which
`medvit evaluate FOLDER` writes as a CSV.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.ndimage import find_objects

from medvit.pipelines.errors import MedvitError, short_reason

__all__ = [
    "INTENSITY_KEYS",
    "STATS_COLUMNS",
    "STATS_SUFFIX",
    "find_statistics",
    "label_statistics",
    "read_statistics",
    "statistics_payload",
    "statistics_rows",
    "summarize_statistics",
    "voxel_volume_ml",
]

STATS_SUFFIX = "_stats.json"
PERCENTILES = (5, 25, 50, 75, 95)
INTENSITY_KEYS = ("mean", "std", "min", "max", *(f"p{p}" for p in PERCENTILES))
STATS_COLUMNS = ("scan", "label", "voxels", "volume_ml", *INTENSITY_KEYS)
# Intensities keep this many significant digits (far below any scanner's precision).
_DIGITS = 7
# Presets whose inputs are CT in Hounsfield units.
_HU_PRESETS = ("ct", "ct-fingerprint")


def voxel_volume_ml(count: int, spacing: Sequence[float]) -> float:
    """`count` voxels of size `spacing` (mm) in millilitres, rounded to 0.001 ml."""
    return round(float(count) * (float(np.prod(spacing)) / 1000.0), 3)


def _significant(value: float) -> float:
    return float(f"{value:.{_DIGITS}g}")


def _intensities(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return dict.fromkeys(INTENSITY_KEYS)
    values = values.astype(np.float64, copy=False)
    percentiles = np.percentile(values, PERCENTILES)
    out = {"mean": values.mean(), "std": values.std(), "min": values.min(), "max": values.max()}
    out.update({f"p{p}": q for p, q in zip(PERCENTILES, percentiles)})
    return {k: _significant(float(v)) for k, v in out.items()}


def label_statistics(
    mask: np.ndarray, scan_array: np.ndarray, spacing: Sequence[float], label_names: Mapping[int, str]
) -> dict[str, dict]:
    """Voxels, volume and intensity statistics of each named label.

    Args:
        mask: Integer label ids, on the scan's grid.
        scan_array: The scan's voxel values, same shape as `mask`.
        spacing: Voxel size in mm along the array's axes.
        label_names: Label id (>= 1) -> name; only these labels are reported, in this order.

    Returns:
        Name -> ``voxels`` (int), ``volume_ml`` (0.001 ml) and the intensities ``mean``,
        ``std`` (population), ``min``, ``max``, ``p5`` ... ``p95`` (7 significant digits).
        A label absent from the mask has 0 voxels, 0 ml and ``None`` intensities.

    Raises:
        ValueError: The arrays differ in shape, the mask is not integer, or a label id is below 1.
    """
    if mask.shape != scan_array.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the scan's {scan_array.shape}")
    if mask.dtype.kind not in "iub":
        raise ValueError(f"a label mask must hold integers, not {mask.dtype}")
    if any(int(lid) < 1 for lid in label_names):
        raise ValueError(f"label ids must be >= 1, got {sorted(label_names)}")
    mask = mask.view(np.uint8) if mask.dtype == bool else mask
    boxes = find_objects(mask, max_label=max(label_names, default=0))
    out: dict[str, dict] = {}
    for lid, name in label_names.items():
        box = boxes[int(lid) - 1]
        values = scan_array[box][mask[box] == lid] if box is not None else np.empty(0, scan_array.dtype)
        out[name] = {"voxels": int(values.size), "volume_ml": voxel_volume_ml(values.size, spacing),
                     **_intensities(values)}  # fmt: skip
    return out


def statistics_payload(
    labels: dict[str, dict], spacing: Sequence[float], intensity_preset: str | None, scan: str
) -> dict:
    """The content of a `<stem>_stats.json`: the scan, units, spacing and per-label statistics."""
    return {
        "scan": scan,
        "units": "HU" if intensity_preset in _HU_PRESETS else "scan units",
        "spacing_mm": [float(s) for s in spacing],
        "labels": labels,
    }


def find_statistics(folder: str | Path) -> list[Path]:
    """The `*_stats.json` files directly in `folder`, sorted by scan name; empty when it is not a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"*{STATS_SUFFIX}") if p.is_file() and not p.name.startswith(".")]
    return sorted(found, key=lambda p: p.name[: -len(STATS_SUFFIX)])


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_label(entry: object) -> str | None:
    """What is wrong with one label's entry, or None."""
    if not isinstance(entry, dict):
        return "is not an object"
    for key in ("voxels", "volume_ml"):
        if not _is_number(entry.get(key)):
            return f"has no number {key!r}"
    for key in INTENSITY_KEYS:
        if key not in entry or not (entry[key] is None or _is_number(entry[key])):
            return f"has no number or null {key!r}"
    return None


def read_statistics(path: str | Path) -> dict:
    """One `<stem>_stats.json`, checked.

    Raises:
        MedvitError: One line naming the file: unreadable, not JSON, or not a stats file.
    """
    path = Path(path)
    made_by = "made by medvit segment --statistics"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MedvitError.at(path, f"not a readable JSON stats file ({short_reason(e)})") from None
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        raise MedvitError.at(path, f"not a stats file {made_by} (no 'labels' object)")
    for name, entry in labels.items():
        problem = _check_label(entry)
        if problem:
            raise MedvitError.at(path, f"label {name!r} {problem} (not a stats file {made_by}?)")
    return data


def statistics_rows(paths: Sequence[Path]) -> list[dict]:
    """One row per (scan, label) of the given stats files, with `STATS_COLUMNS` keys.

    The scan is the file name without `_stats.json`; labels keep their order in each file.
    """
    rows = []
    for path in paths:
        scan = path.name[: -len(STATS_SUFFIX)]
        for label, entry in read_statistics(path)["labels"].items():
            rows.append({"scan": scan, "label": label, **{k: entry[k] for k in STATS_COLUMNS[2:]}})
    return rows


def summarize_statistics(rows: Sequence[dict]) -> list[dict]:
    """Per label (in order of first appearance): scans, scans where it is present, and the
    medians over those of its volume and mean intensity (None when present in none)."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    out = []
    for label, group in by_label.items():
        present = [r for r in group if r["voxels"] > 0]
        out.append({
            "label": label,
            "scans": len(group),
            "present": len(present),
            "median_volume_ml": float(np.median([r["volume_ml"] for r in present])) if present else None,
            "median_mean": float(np.median([r["mean"] for r in present])) if present else None,
        })  # fmt: skip
    return out
