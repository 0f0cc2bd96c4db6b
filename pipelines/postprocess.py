"""Connected-component post-processing, chosen per label on validation predictions.

After nnU-Net's `determine_postprocessing` (Isensee et al., Nature Methods 2021): for
every label, try removing its components under a volume, or all but its largest connected
component, on the validation cases' predictions, and keep the rule that scores best only
if it raises the label's mean Dice, as nnU-Net does: a rule validation shows no benefit for
is not applied (keeping only the largest piece can delete a real organ in favour of a
larger false one elsewhere). Among equally good rules the mildest wins. The chosen rules travel in the checkpoint's card (`ModelCard.postprocessing`) and
`medvit segment` applies them to the mask it writes.

A rule is a dict: `{"id": <label id in masks>, "name": ..., "rule": "largest"}` or
`{"id": ..., "name": ..., "rule": "min_ml", "min_ml": <ml>}`. Removed voxels become
background. Components are 26-connected (scipy.ndimage.label with a full structure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medvit.pipelines.errors import MedvitError

RULES = ("largest", "min_ml")
# Sizes tried for `min_ml`: small fractions of the smallest reference component of the label
# over the validation cases, and never above MIN_ML_CAP. A scan that shows only part of an
# organ (a short series, a field of view that cuts the liver) has a piece far smaller than
# the whole organ validation saw: a threshold near the organ's size deletes the organ there.
MIN_ML_FRACTIONS = (0.05, 0.1)
MIN_ML_CAP = 25.0
_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
# A rule must raise the mean validation Dice by more than float noise to be kept.
MIN_GAIN = 1e-6


@dataclass
class ValidationCase:
    """One validation case: predicted and reference class maps on the same grid.

    Attributes:
        pred: Predicted class indices (0 = background).
        ref: Reference class indices.
        voxel_ml: Volume of one voxel in ml.
    """

    pred: np.ndarray
    ref: np.ndarray
    voxel_ml: float


def _components(binary: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """Component labels within the bounding box of `binary`, their sizes (index 0 unused)
    and the box; a large scan is labelled only where the label is."""
    bounds = []
    for axis in range(binary.ndim):
        hit = np.flatnonzero(binary.any(axis=tuple(a for a in range(binary.ndim) if a != axis)))
        if hit.size == 0:
            return np.zeros((0,) * binary.ndim, dtype=np.int32), np.zeros(1, dtype=np.int64), ()
        bounds.append(slice(int(hit[0]), int(hit[-1]) + 1))
    sl = tuple(bounds)
    comp, n = ndimage.label(binary[sl], structure=_STRUCTURE)
    return comp, np.bincount(comp.reshape(-1), minlength=n + 1), sl


def _removed(binary: np.ndarray, rule: Mapping[str, Any], voxel_ml: float) -> tuple[np.ndarray, tuple[slice, ...]] | None:
    """The voxels the rule removes from `binary` (within a box), or None when it removes none."""
    comp, sizes, sl = _components(binary)
    if len(sizes) <= 1:
        return None
    if rule["rule"] == "largest":
        drop = np.ones(len(sizes), dtype=bool)
        drop[0] = False
        drop[1 + int(np.argmax(sizes[1:]))] = False
    else:
        drop = sizes * voxel_ml < float(rule["min_ml"])
        drop[0] = False
    if not drop.any():
        return None
    return drop[comp], sl


def apply_rule(mask: np.ndarray, value: int, rule: Mapping[str, Any], voxel_ml: float) -> np.ndarray:
    """`mask` (modified in place and returned) with the rule applied to the voxels equal to `value`."""
    hit = _removed(mask == value, rule, voxel_ml)
    if hit is not None:
        remove, sl = hit
        mask[sl][remove] = 0
    return mask


def apply_postprocessing(mask: np.ndarray, rules: Sequence[Mapping[str, Any]] | None, spacing: Sequence[float]) -> np.ndarray:
    """A label-id mask with the card's rules applied (in place; returned).

    Args:
        mask: Label ids as written in masks.
        rules: `ModelCard.postprocessing` (None or empty: nothing to do).
        spacing: Voxel size in mm of the mask's grid.

    Raises:
        MedvitError: A rule the card holds is malformed.
    """
    voxel_ml = float(np.prod(np.abs(np.asarray(spacing, dtype=float)))) / 1000.0
    for rule in rules or ():
        if rule.get("rule") not in RULES or "id" not in rule or (rule["rule"] == "min_ml" and "min_ml" not in rule):
            raise MedvitError(f"checkpoint post-processing rule {dict(rule)} is malformed")
        apply_rule(mask, int(rule["id"]), rule, voxel_ml)
    return mask


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = int(pred.sum()) + int(ref.sum())
    return float("nan") if total == 0 else 2.0 * int((pred & ref).sum()) / total


def _mean_dice(cases: Sequence[ValidationCase], cls: int, rule: Mapping[str, Any] | None) -> float:
    scores = []
    for case in cases:
        pred, ref = case.pred == cls, case.ref == cls
        if rule is not None:
            hit = _removed(pred, rule, case.voxel_ml)
            if hit is not None:
                remove, sl = hit
                pred = pred.copy()
                pred[sl][remove] = False
        scores.append(_dice(pred, ref))
    valid = [s for s in scores if not np.isnan(s)]
    return float(np.mean(valid)) if valid else float("nan")


def _smallest_reference_ml(cases: Sequence[ValidationCase], cls: int) -> float | None:
    smallest = None
    for case in cases:
        _, sizes, _ = _components(case.ref == cls)
        if len(sizes) > 1:
            ml = float(sizes[1:].min()) * case.voxel_ml
            smallest = ml if smallest is None else min(smallest, ml)
    return smallest


def candidate_rules(cases: Sequence[ValidationCase], cls: int) -> list[dict[str, Any]]:
    """Rules tried for class `cls`, mildest first (ties go to the earlier one)."""
    rules: list[dict[str, Any]] = []
    smallest = _smallest_reference_ml(cases, cls)
    if smallest is not None:
        sizes = sorted({round(min(smallest * f, MIN_ML_CAP), 3) for f in MIN_ML_FRACTIONS})
        rules += [{"rule": "min_ml", "min_ml": ml} for ml in sizes]
    return rules + [{"rule": "largest"}]


def determine_postprocessing(
    cases: Sequence[ValidationCase], labels: Mapping[int, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The rule kept for each label: the candidate with the best mean validation Dice, only
    if that is above the Dice without post-processing (the mildest of equals). Labels absent
    from every validation case (prediction and reference) get no rule: nothing shows whether
    one helps.

    Args:
        cases: Validation predictions and references (class indices, model space).
        labels: `ModelCard.labels`: class index -> {"id", "name"}.

    Returns:
        Rules in class order, for `ModelCard.postprocessing`.
    """
    chosen = []
    for cls in sorted(labels):
        base = _mean_dice(cases, cls, None)
        if np.isnan(base):
            continue
        best, best_dice = None, base
        for rule in candidate_rules(cases, cls):
            d = _mean_dice(cases, cls, rule)
            if d > best_dice + MIN_GAIN:
                best, best_dice = rule, d
        if best is not None:
            chosen.append({"id": int(labels[cls]["id"]), "name": str(labels[cls]["name"]), **best})
    return chosen
