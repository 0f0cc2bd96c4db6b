"""Robustness curves: Dice per label of a model on perturbed copies of scans, against severity.

One loaded `Segmenter` segments every copy in memory (nothing is written but the results):
for each scan and its reference labels, each perturbation of `medvit.pipelines.perturb`
at each severity level is applied, the copy is segmented on the scan's own grid and scored
against the labels (moved with the image where the perturbation moves it) by
`medvit.pipelines.evaluate.score_labels`: MONAI's Dice and percentile Hausdorff distance.
Level 0 is the scan itself, segmented once and shared by every perturbation.

The checkpoint's labels are the ones scored. Without reference names its label ids are
taken to be the reference's ids (as `medvit evaluate PRED GT` compares ids); with them
(`reference_labels`, id -> name of the reference map) labels are matched by name, so a
model with its own numbering can be scored on, say, a TotalSegmentator label map.

Results: the rows (`CURVE_COLUMNS`), their means per perturbation, level and label
(`summarize_curve`), a CSV of both (`write_curve_csv`) and a PNG with one panel per
perturbation, mean Dice per label against severity (`plot_curves`, drawn with Pillow).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from medvit.pipelines.atomic import write_csv
from medvit.pipelines.errors import MedvitError, one_line
from medvit.pipelines.evaluate import check_same_grid, label_array, mean_row, score_labels
from medvit.pipelines.io import Scan, read_scan
from medvit.pipelines.perturb import PERTURBATIONS, check_levels, check_perturbations, perturb
from medvit.pipelines.segmenter import SegmentConfig, Segmenter

__all__ = [
    "CURVE_COLUMNS",
    "RobustnessConfig",
    "match_labels",
    "robustness_curve",
    "summarize_curve",
    "write_curve_csv",
]

CURVE_COLUMNS = (
    "case", "perturbation", "level", "parameter", "value", "label_id", "label", "dice", "hd95_mm", "pred_ml", "gt_ml",
)  # fmt: skip


@dataclass
class RobustnessConfig:
    """How the curve is measured.

    Attributes:
        segment: How each copy is segmented (device, precision, overlap, ...); its progress
            bars are turned off (`progress` below counts the copies).
        reference_labels: Label id -> name of the reference label maps; labels are then
            matched to the checkpoint's by name. None: the reference uses the checkpoint's ids.
        seed: Seed of the noise (combined with the scan's index and the level).
        hd_percentile: Percentile of the Hausdorff distance, in (0, 100].
        progress: Show a progress bar over the segmented copies.
    """

    segment: SegmentConfig = field(default_factory=SegmentConfig)
    reference_labels: dict[int, str] | None = None
    seed: int = 0
    hd_percentile: float = 95.0
    progress: bool = True


def match_labels(model: dict[int, str], reference: dict[int, str] | None) -> dict[int, int]:
    """Model label id -> reference label id of the labels to score.

    Args:
        model: The checkpoint's id -> name.
        reference: The reference map's id -> name, or None when it uses the model's ids.

    Returns:
        Every model label with its reference id (by name when `reference` is given; model
        labels the reference does not name are left out).

    Raises:
        MedvitError: No model label is named in `reference`.
    """
    if reference is None:
        return {lid: lid for lid in model}
    by_name = {name: rid for rid, name in reference.items()}
    matched = {lid: by_name[name] for lid, name in model.items() if name in by_name}
    if not matched:
        raise MedvitError(one_line(
            f"none of the checkpoint's labels ({', '.join(model.values())}) is named in the reference labels "
            f"({', '.join(list(reference.values())[:8])}{', ...' if len(reference) > 8 else ''})"
        ))  # fmt: skip
    return matched


def _reference_in_model_ids(labels: np.ndarray, matched: dict[int, int]) -> np.ndarray:
    """The reference map with each matched reference id replaced by its model id, the rest 0."""
    top = max(int(labels.max()) if labels.size else 0, *matched.values())
    lut = np.zeros(top + 1, dtype=np.uint16)
    for model_id, ref_id in matched.items():
        lut[ref_id] = model_id
    out = lut[labels]
    return out.astype(np.uint8) if max(matched) < 256 else out


def _window(seg: Segmenter) -> tuple[float, float] | None:
    """The model's intensity window, for the contrast and gamma perturbations."""
    if seg.prep.intensity == "ct":
        return tuple(seg.prep.ct_window)  # type: ignore[return-value]
    if seg.prep.intensity == "ct-fingerprint" and seg.prep.ct_clip is not None:
        return tuple(seg.prep.ct_clip)  # type: ignore[return-value]
    return None


def _read_pair(scan_path: Path, label_path: Path) -> tuple[Scan, np.ndarray]:
    scan, ref = read_scan(scan_path), read_scan(label_path)
    check_same_grid(scan, ref, ("scan", "labels"))
    return scan, label_array(ref)


def robustness_curve(
    checkpoint: str | Path | Sequence[str | Path] | Segmenter,
    scans_and_labels: Sequence[tuple[str | Path, str | Path]],
    perturbations: Sequence[str],
    levels: Sequence[int],
    config: RobustnessConfig | None = None,
    on_scan: Callable[[str], None] | None = None,
) -> list[dict]:
    """Segment perturbed copies of each scan with one model and score them against the labels.

    Args:
        checkpoint: A checkpoint (or several, an ensemble), or a `Segmenter` already loaded.
        scans_and_labels: (scan, reference label map) file pairs on the same grid.
        perturbations: Names from `PERTURBATIONS`, in the order the rows take.
        levels: Severity levels, 0 (the scan itself) to `MAX_LEVEL`.
        config: Segmentation, label names, seed; defaults to `RobustnessConfig()`.
        on_scan: Called with each scan's case name before it is processed.

    Returns:
        One row per scan, perturbation, level and scored label, with the keys of
        `CURVE_COLUMNS` (``parameter`` names the perturbation's physical parameter,
        ``value`` its value at that level).

    Raises:
        MedvitError: Unknown perturbations or levels, an unusable checkpoint, a scan or label
            map that cannot be read or is not on one grid, labels that cannot be matched.
    """
    config = config or RobustnessConfig()
    perturbations = check_perturbations(perturbations)
    levels = check_levels(levels)
    if not scans_and_labels:
        raise MedvitError("no scan given")
    if not 0 < config.hd_percentile <= 100:
        raise MedvitError(f"HD percentile must be in (0, 100], got {config.hd_percentile!r}")
    seg = checkpoint if isinstance(checkpoint, Segmenter) else Segmenter(checkpoint, _quiet(config.segment))
    matched = match_labels(seg.label_names, config.reference_labels)
    names = {lid: seg.label_names[lid] for lid in sorted(matched)}
    window = _window(seg)
    steps = len(scans_and_labels) * (len(perturbations) * sum(1 for v in levels if v > 0) + (0 in levels))
    bar = tqdm(total=steps, desc="robustness", unit="copy", disable=not config.progress)
    rows: list[dict] = []
    try:
        for index, (scan_path, label_path) in enumerate(scans_and_labels):
            scan, labels = _read_pair(Path(scan_path), Path(label_path))
            if on_scan is not None:
                on_scan(scan.stem)
            labels = _reference_in_model_ids(labels, matched)
            voxel_ml = abs(float(np.linalg.det(scan.affine[:3, :3]))) / 1000.0
            unperturbed: list[dict] | None = None
            for name in perturbations:
                spec = PERTURBATIONS[name]
                for level in levels:
                    if level == 0 and unperturbed is not None:
                        scores = unperturbed
                    else:
                        copy, moved = perturb(scan, labels, name, level, (config.seed, index), window)
                        mask = seg.predict(copy)
                        del copy
                        scores = score_labels(mask, moved, names, scan.spacing, voxel_ml, config.hd_percentile)
                        bar.update()
                        if level == 0:
                            unperturbed = scores
                    for score in scores:
                        rows.append({"case": scan.stem, "perturbation": name, "level": level,
                                     "parameter": spec.parameter, "value": spec.values[level], **score})  # fmt: skip
    finally:
        bar.close()
    return rows


def _quiet(config: SegmentConfig) -> SegmentConfig:
    return replace(config, progress=False)


def summarize_curve(rows: Sequence[dict]) -> list[dict]:
    """Means over cases per perturbation, level and label.

    Args:
        rows: Rows of `robustness_curve`.

    Returns:
        Rows with `CURVE_COLUMNS` (``case`` = ``"mean"``; Dice, HD and volumes averaged, an
        ``inf`` HD in any case making the mean ``inf``) and ``n``, the number of cases, in
        the order perturbations first appear, then level, then label id.
    """
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["perturbation"], int(row["level"]), int(row["label_id"])), []).append(row)
    order = {name: i for i, name in enumerate(dict.fromkeys(r["perturbation"] for r in rows))}
    keep = ("perturbation", "level", "parameter", "value", "label_id", "label")
    return [mean_row(groups[key], keep) for key in sorted(groups, key=lambda k: (order[k[0]], k[1], k[2]))]


def write_curve_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """The per-case rows, then the mean rows of `summarize_curve`, with `CURVE_COLUMNS`, atomically."""
    return write_csv(path, CURVE_COLUMNS, [*rows, *summarize_curve(rows)])
