"""Evaluation of predicted label masks against reference masks: per-label Dice and HD95.

Dice and the percentile Hausdorff distance come from MONAI (``compute_dice`` and
``compute_hausdorff_distance``), the latter in millimetres using the voxel spacing.
Surfaces are MONAI's: the voxels of a mask that a 6-connected erosion removes; the
HD95 is the larger of the two directed 95th percentiles of surface-to-surface distances.

Conventions (per case and label):

- Both masks empty for a label: Dice 1.0 and HD95 0.0 (nothing to find, nothing found).
  This only happens for labels named in ``EvalConfig.labels``; without names, only the
  labels present in either mask of a case are evaluated for that case.
- Exactly one mask empty: Dice 0.0 and HD95 ``inf`` (a missed or invented structure has
  no finite boundary distance). ``inf`` is kept in the per-label means, so a mean HD95
  of ``inf`` says that at least one case missed the structure.
- Volumes are voxel count times voxel volume (from the affine), in millilitres.

Both masks of a pair must be on the same grid: same shape and affines equal within
1e-3 mm. Nothing is resampled; a mismatch is a user error naming both files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.ndimage import find_objects
from tqdm.auto import tqdm

from medvit.pipelines.atomic import write_csv as write_csv_rows
from medvit.pipelines.errors import MedvitError, one_line
from medvit.pipelines.io import Scan, find_scans, is_dicom_folder, read_scan, scan_stem

__all__ = [
    "CSV_COLUMNS",
    "EvalConfig",
    "UnmatchedCaseWarning",
    "check_same_grid",
    "evaluate",
    "evaluate_pair",
    "label_array",
    "mean_row",
    "pair_cases",
    "score_labels",
    "summarize",
    "write_csv",
]

CSV_COLUMNS = ("case", "label_id", "label", "dice", "hd95_mm", "pred_ml", "gt_ml")
MEAN_CASE = "mean"
# Suffix `medvit segment` adds to a scan's stem when it writes the mask.
PRED_SUFFIX = "_seg"
GRID_ATOL_MM = 1e-3
# Above this a "mask" is almost surely an image passed by mistake (and find_objects
# would allocate one slot per possible label).
MAX_LABEL = 65535
_MAX_NAMES_SHOWN = 5


class UnmatchedCaseWarning(UserWarning):
    """Some files in a PRED or GT folder have no partner and are not evaluated."""


@dataclass
class EvalConfig:
    """What to evaluate.

    Attributes:
        labels: Label id -> name. ``None`` evaluates, per case, every id > 0 present in
            either mask and names it ``label_<id>``.
        hd_percentile: Percentile of the Hausdorff distance, in (0, 100]; the
            ``hd95_mm`` column holds this percentile (95 unless changed).
    """

    labels: dict[int, str] | None = None
    hd_percentile: float = 95.0


def _check_config(config: EvalConfig) -> None:
    p = config.hd_percentile
    if not (isinstance(p, (int, float)) and 0 < p <= 100):
        raise MedvitError(one_line(f"HD percentile must be in (0, 100], got {p!r}"))
    if config.labels is not None:
        if not config.labels:
            raise MedvitError("the label list is empty; give at least one label id, or none to use all")
        for label_id in config.labels:
            if int(label_id) != label_id or not 0 < label_id <= MAX_LABEL:
                raise MedvitError(
                    one_line(f"label id {label_id!r} must be an integer from 1 to {MAX_LABEL} (0 is background)")
                )


def label_array(scan: Scan) -> np.ndarray:
    """The mask as a non-negative integer array, or a user error saying why it is not a mask."""
    array = scan.array
    if array.dtype == bool:
        return array.view(np.uint8)
    if array.dtype.kind == "f":
        if array.size and not np.array_equal(array, np.round(array)):
            raise MedvitError.at(scan.path, "not a label mask (has non-integer values; is it an image?)")
        low = float(array.min()) if array.size else 0.0
        high = float(array.max()) if array.size else 0.0
    else:
        low = int(array.min()) if array.size else 0
        high = int(array.max()) if array.size else 0
    if low < 0:
        raise MedvitError.at(scan.path, f"not a label mask (has negative value {low:g}; is it an image?)")
    if high > MAX_LABEL:
        raise MedvitError.at(scan.path, f"not a label mask (label {high:g} is above {MAX_LABEL}; is it an image?)")
    if array.dtype.kind == "f" or array.dtype.itemsize > 4:
        return array.astype(np.int32)
    return array


def check_same_grid(pred: Scan, gt: Scan, roles: tuple[str, str] = ("prediction", "reference")) -> None:
    """Raise a one-line `MedvitError` naming both files (as `roles`) unless they share one grid."""
    where = f"{roles[0]} {pred.path} and {roles[1]} {gt.path}"
    if pred.shape != gt.shape:
        raise MedvitError(one_line(f"{where} are not on the same grid: shape {pred.shape} vs {gt.shape}"))
    diff = np.abs(pred.affine - gt.affine)
    if not np.allclose(pred.affine, gt.affine, rtol=0.0, atol=GRID_ATOL_MM):
        details = []
        if pred.orientation() != gt.orientation():
            details.append(f"orientation {pred.orientation()} vs {gt.orientation()}")
        sp, sg = np.round(pred.spacing, 4), np.round(gt.spacing, 4)
        if not np.allclose(sp, sg, rtol=0.0, atol=GRID_ATOL_MM):
            details.append(f"spacing {tuple(float(v) for v in sp)} vs {tuple(float(v) for v in sg)} mm")
        if diff[:3, 3].max() > GRID_ATOL_MM:
            op, og = np.round(pred.affine[:3, 3], 3), np.round(gt.affine[:3, 3], 3)
            details.append(f"origin {tuple(float(v) for v in op)} vs {tuple(float(v) for v in og)} mm")
        details.append(f"affines differ by up to {diff.max():.4g} mm")
        raise MedvitError(one_line(f"{where} are not on the same grid: {'; '.join(details)}"))


def _bbox(a: slice | None, b: slice | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Union of two find_objects boxes, grown by one voxel so erosion sees background round the mask."""
    boxes = [box for box in (a, b) if box is not None]
    out = []
    for axis, n in enumerate(shape):
        start = min(box[axis].start for box in boxes)
        stop = max(box[axis].stop for box in boxes)
        out.append(slice(max(start - 1, 0), min(stop + 1, n)))
    return tuple(out)


def evaluate_pair(pred_path: str | Path, gt_path: str | Path, config: EvalConfig | None = None) -> list[dict]:
    """Dice, HD95 and volumes of one predicted mask against its reference, per label.

    Args:
        pred_path: Predicted label mask (any format `read_scan` reads).
        gt_path: Reference label mask on the same grid.
        config: Labels and HD percentile; defaults to `EvalConfig()`.

    Returns:
        One row per label, sorted by label id, with keys ``case`` (the reference's stem),
        ``label_id``, ``label``, ``dice``, ``hd95_mm``, ``pred_ml`` and ``gt_ml``.

    Raises:
        MedvitError: A file cannot be read (`ScanError`), is not a label mask, or the
            two masks are not on the same grid.
    """
    config = config or EvalConfig()
    _check_config(config)
    pred_scan, gt_scan = read_scan(pred_path), read_scan(gt_path)
    check_same_grid(pred_scan, gt_scan)
    pred, gt = label_array(pred_scan), label_array(gt_scan)

    if config.labels is None:
        names = None
    else:
        names = {int(k): str(v) for k, v in sorted(config.labels.items())}
    voxel_ml = abs(float(np.linalg.det(gt_scan.affine[:3, :3]))) / 1000.0
    rows = score_labels(pred, gt, names, gt_scan.spacing, voxel_ml, config.hd_percentile)
    return [{"case": gt_scan.stem, **row} for row in rows]


def score_labels(
    pred: np.ndarray,
    gt: np.ndarray,
    names: dict[int, str] | None,
    spacing: Sequence[float],
    voxel_ml: float,
    hd_percentile: float = 95.0,
) -> list[dict]:
    """Dice, percentile HD and volumes of two label arrays on one grid, per label.

    Args:
        pred: Predicted label ids (non-negative integers).
        gt: Reference label ids, same shape.
        names: Label id -> name to score; None scores every id > 0 present in either
            array, named ``label_<id>``.
        spacing: Voxel size in mm along the array's axes.
        voxel_ml: Volume of one voxel in millilitres.
        hd_percentile: Percentile of the Hausdorff distance, in (0, 100].

    Returns:
        One row per label, sorted by id: ``label_id``, ``label``, ``dice``, ``hd95_mm``,
        ``pred_ml`` and ``gt_ml`` (conventions for empty labels: the module docstring).
    """
    # One pass each gives every label's bounding box: label maps with a hundred
    # structures are then measured on small crops instead of the whole volume.
    pred_boxes, gt_boxes = find_objects(pred), find_objects(gt)
    if names is None:
        present = {i + 1 for boxes in (pred_boxes, gt_boxes) for i, box in enumerate(boxes) if box is not None}
        names = {label_id: f"label_{label_id}" for label_id in sorted(present)}
    spacing = tuple(float(s) for s in spacing)
    rows = []
    for label_id, name in sorted(names.items()):
        pbox = pred_boxes[label_id - 1] if label_id <= len(pred_boxes) else None
        gbox = gt_boxes[label_id - 1] if label_id <= len(gt_boxes) else None
        if pbox is None and gbox is None:
            n_pred = n_gt = 0
            dice, hd = 1.0, 0.0
        else:
            crop = _bbox(pbox, gbox, gt.shape)
            p = pred[crop] == label_id
            g = gt[crop] == label_id
            n_pred, n_gt = int(np.count_nonzero(p)), int(np.count_nonzero(g))
            if n_pred == 0 or n_gt == 0:
                dice, hd = 0.0, math.inf
            else:
                dice, hd = _dice_hd(p, g, spacing, hd_percentile)
        rows.append(
            {
                "label_id": label_id,
                "label": name,
                "dice": dice,
                "hd95_mm": hd,
                "pred_ml": n_pred * voxel_ml,
                "gt_ml": n_gt * voxel_ml,
            }
        )
    return rows


def _dice_hd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float) -> tuple[float, float]:
    """MONAI Dice and percentile HD (mm) of two non-empty binary masks."""
    y_pred = torch.from_numpy(pred)[None, None]
    y = torch.from_numpy(gt)[None, None]
    dice = compute_dice(y_pred.float(), y.float(), include_background=True)
    with warnings.catch_warnings():
        # MONAI's own internal call uses an argument it deprecated; not the user's concern.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        hd = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=percentile, spacing=list(spacing)
        )
    return float(dice.item()), float(hd.item())


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_MAX_NAMES_SHOWN])
    more = len(paths) - _MAX_NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _is_single(path: Path) -> bool:
    return path.is_file() or is_dicom_folder(path)


def _by_stem(paths: Sequence[Path], folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in paths:
        stem = scan_stem(path)
        if stem in out:
            raise MedvitError.at(folder, f"two masks for case {stem!r} ({out[stem].name} and {path.name})")
        out[stem] = path
    return out


def pair_cases(
    pred: str | Path, gt: str | Path, roles: tuple[str, str] = ("prediction", "reference mask")
) -> list[tuple[str, Path, Path]]:
    """Pair predicted masks with reference masks by case name.

    Two files form one pair whatever their names. Otherwise files are matched by stem
    (the file name without its scan suffix); a prediction named ``<stem>_seg`` (what
    ``medvit segment`` writes) also matches ``<stem>``, exact names winning. When both
    are folders, files without a partner are skipped with an `UnmatchedCaseWarning`;
    when one side is a single file, only its partner is looked for.

    Args:
        pred: Predicted mask file, or a folder of them.
        gt: Reference mask file, or a folder of them.
        roles: What the two sides are, as messages name them (singular).

    Returns:
        ``(case, pred_path, gt_path)`` in the order of the reference files; ``case`` is
        the reference's stem.

    Raises:
        MedvitError: A path is missing or holds no scans, a folder holds two masks of
            one case, or no prediction matches any reference.
    """
    pred, gt = Path(pred), Path(gt)
    preds, gts = find_scans([pred]), find_scans([gt])
    pred_single, gt_single = _is_single(pred), _is_single(gt)
    if pred_single and gt_single:
        return [(scan_stem(gt), pred, gt)]

    pred_by_stem, gt_by_stem = _by_stem(preds, pred), _by_stem(gts, gt)
    matches: dict[str, str] = {}  # gt stem -> pred stem
    for stem in pred_by_stem:
        if stem in gt_by_stem:
            matches[stem] = stem
    for stem in pred_by_stem:
        base = stem[: -len(PRED_SUFFIX)] if stem.endswith(PRED_SUFFIX) else None
        if base and base in gt_by_stem and base not in matches and stem not in matches.values():
            matches[base] = stem
    pairs = [(g, pred_by_stem[matches[g]], gt_by_stem[g]) for g in gt_by_stem if g in matches]

    lone_preds = [p for s, p in pred_by_stem.items() if s not in matches.values()]
    lone_gts = [p for s, p in gt_by_stem.items() if s not in matches]
    if not pairs:
        raise MedvitError(one_line(
            f"no {roles[0]} in {pred} matches a {roles[1]} in {gt} by name "
            f"({roles[0]}s: {_names(preds)}; {roles[1]}s: {_names(gts)}; "
            f"a {roles[0]} matches as <case> or <case>{PRED_SUFFIX})"
        ))
    if not pred_single and not gt_single:
        if lone_gts:
            warnings.warn(
                f"{len(lone_gts)} {roles[1]}(s) in {gt} have no {roles[0]} and are not evaluated: "
                f"{_names(lone_gts)}",
                UnmatchedCaseWarning,
                stacklevel=2,
            )
        if lone_preds:
            warnings.warn(
                f"{len(lone_preds)} {roles[0]}(s) in {pred} have no {roles[1]} and are not evaluated: "
                f"{_names(lone_preds)}",
                UnmatchedCaseWarning,
                stacklevel=2,
            )
    return pairs


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per-label means over cases.

    Args:
        rows: Per-case rows from `evaluate_pair` or `evaluate`.

    Returns:
        One row per label id (sorted) with ``case`` = ``"mean"``, the same metric keys
        averaged over the cases that have that label, and ``n``, the number of cases.
        An ``inf`` HD95 in any case makes the mean ``inf``.
    """
    by_label: dict[int, list[dict]] = {}
    for row in rows:
        by_label.setdefault(int(row["label_id"]), []).append(row)
    return [mean_row(by_label[label_id], ("label_id", "label")) for label_id in sorted(by_label)]


def mean_row(group: Sequence[dict], keep: Sequence[str]) -> dict:
    """One ``mean`` row of a group of per-case rows: the `keep` keys of the first row, the metrics
    (Dice, HD, volumes) averaged (an ``inf`` HD in any row makes the mean ``inf``), ``n`` rows."""
    mean = {"case": MEAN_CASE, **{key: group[0][key] for key in keep}}
    for key in ("dice", "hd95_mm", "pred_ml", "gt_ml"):
        mean[key] = float(np.mean([float(r[key]) for r in group]))
    mean["n"] = len(group)
    return mean


def write_csv(rows: Sequence[dict], csv_path: str | Path) -> Path:
    """Write rows with `CSV_COLUMNS` atomically (temporary file, then rename).

    Args:
        rows: Rows to write, in order; extra keys are ignored.
        csv_path: Target file; missing parent folders are created.

    Returns:
        The path written.

    Raises:
        MedvitError: The file cannot be written.
    """
    return write_csv_rows(csv_path, CSV_COLUMNS, rows)


def evaluate(
    pred: str | Path,
    gt: str | Path,
    config: EvalConfig | None = None,
    csv_path: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Evaluate predicted masks against reference masks, case by case and label by label.

    Args:
        pred: Predicted mask file or folder (see `pair_cases` for how names match).
        gt: Reference mask file or folder.
        config: Labels and HD percentile; defaults to `EvalConfig()`.
        csv_path: When given, a CSV with the per-case rows followed by one ``mean`` row
            per label is written there (atomically).
        progress: Show a progress bar over cases.

    Returns:
        The per-case rows of `evaluate_pair`, case after case (means: see `summarize`).

    Raises:
        MedvitError: Bad paths, no matching cases, unreadable or mismatched masks, or
            an unwritable CSV. Nothing is written then.
    """
    config = config or EvalConfig()
    _check_config(config)
    pairs = pair_cases(pred, gt)
    rows: list[dict] = []
    for _, pred_path, gt_path in tqdm(pairs, desc="evaluate", unit="case", disable=not progress or len(pairs) < 2):
        rows.extend(evaluate_pair(pred_path, gt_path, config))
    if csv_path is not None:
        write_csv([*rows, *summarize(rows)], csv_path)
    return rows
