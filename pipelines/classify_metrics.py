"""Classification metrics, and the predictions CSV that `predict` writes and `evaluate` reads.

`classification_metrics` gives accuracy, balanced accuracy (the mean recall over the classes
present in the labels), the area under the ROC curve of each class against the rest
(MONAI's `compute_roc_auc`; None where the labels hold only one value for that class, and
left out of the macro mean), the confusion matrix (rows true, columns predicted) and each
class's precision and recall (None where undefined). Every value is JSON-ready.

The predictions CSV: `id`, optionally `path`, `predicted` (a class name), then `p_<class>`
for every class in the model's order. A ground-truth CSV has `label` (a class name) and
`id` or `path`; predictions are matched to it by id.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvit.pipelines.atomic import write_csv
from medvit.pipelines.errors import MedvitError, short_reason

__all__ = [
    "Predictions",
    "classification_metrics",
    "evaluate_predictions",
    "match_truth",
    "read_predictions_csv",
    "read_truth_csv",
    "write_predictions_csv",
]

PROB_PREFIX = "p_"
_SHOWN = 3


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """One class against the rest; None when `positive` holds one value only (AUROC undefined)."""
    if positive.all() or not positive.any():
        return None
    import torch
    from monai.metrics import compute_roc_auc

    return float(compute_roc_auc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(positive, dtype=torch.int64)))


def classification_metrics(probs: np.ndarray, labels: Sequence[int] | np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of predicted class probabilities against true labels.

    Args:
        probs: (N, K) scores per class (probabilities, or any scores ranked the same way);
            the predicted class is the arg-max of each row.
        labels: (N,) true class indices in [0, K).
        classes: The K class names.

    Returns:
        `n`, `accuracy`, `balanced_accuracy`, `auroc_macro`, `confusion_matrix` (K x K lists,
        rows true, columns predicted), `classes`, and `per_class`: for each class name its
        `support`, `precision`, `recall` and `auroc`.

    Raises:
        ValueError: Shapes disagree, there are no examples, or a label is outside [0, K).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    k = len(classes)
    if probs.ndim != 2 or probs.shape[1] != k:
        raise ValueError(f"probs must be (N, {k}) for {k} classes, got shape {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be ({probs.shape[0]},), got shape {labels.shape}")
    if not len(labels):
        raise ValueError("no examples to evaluate")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be integers in [0, {k}), got {np.unique(labels)[:5].tolist()}")
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    support, called, hits = confusion.sum(axis=1), confusion.sum(axis=0), np.diag(confusion)
    per_class = {}
    for c, name in enumerate(classes):
        per_class[str(name)] = {
            "support": int(support[c]),
            "precision": _ratio(hits[c], called[c]),
            "recall": _ratio(hits[c], support[c]),
            "auroc": _auroc(probs[:, c], labels == c),
        }
    recalls = [v["recall"] for v in per_class.values() if v["recall"] is not None]
    aurocs = [v["auroc"] for v in per_class.values() if v["auroc"] is not None]
    return {
        "n": len(labels),
        "accuracy": float(hits.sum() / len(labels)),
        "balanced_accuracy": float(np.mean(recalls)),
        "auroc_macro": float(np.mean(aurocs)) if aurocs else None,
        "classes": [str(c) for c in classes],
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
    }


@dataclass
class Predictions:
    """A predictions CSV read back.

    Attributes:
        ids: One per row, in file order.
        probs: (N, K) probabilities.
        classes: The K class names, in the file's column order.
        paths: The `path` column, or None when the file has none.
    """

    ids: list[str]
    probs: np.ndarray
    classes: list[str]
    paths: list[str] | None = None


def write_predictions_csv(
    path: str | Path,
    ids: Sequence[str],
    probs: np.ndarray,
    classes: Sequence[str],
    paths: Sequence[str | Path] | None = None,
) -> Path:
    """Write `id`, [`path`], `predicted`, `p_<class>`... atomically; probabilities exactly
    (shortest round-trip decimal), so what is read back equals what was written.

    Raises:
        ValueError: `probs` is not (len(ids), len(classes)), or `paths` has another length.
        MedvitError: The file cannot be written.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), len(classes)):
        raise ValueError(f"probs must be ({len(ids)}, {len(classes)}), got shape {probs.shape}")
    if paths is not None and len(paths) != len(ids):
        raise ValueError(f"{len(paths)} paths for {len(ids)} ids")
    prob_cols = [PROB_PREFIX + str(c) for c in classes]
    columns = ["id", *(["path"] if paths is not None else []), "predicted", *prob_cols]
    rows = []
    for i, row_id in enumerate(ids):
        row = {"id": row_id, "predicted": classes[int(probs[i].argmax())]}
        if paths is not None:
            row["path"] = str(paths[i])
        row.update({col: repr(float(p)) for col, p in zip(prob_cols, probs[i])})
        rows.append(row)
    return write_csv(path, columns, rows)


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise MedvitError.at(path, "no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{(h or "").strip(): (v or "").strip() for h, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedvitError.at(path, f"cannot read CSV ({short_reason(exc)})") from None
    if not rows:
        raise MedvitError.at(path, "no rows under the header")
    return header, rows


def _names(values: Sequence[str]) -> str:
    more = len(values) - _SHOWN
    return ", ".join(values[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _unique_ids(path: Path, ids: list[str]) -> None:
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise MedvitError.at(path, f"duplicate ids: {_names(duplicates)}")
    blank = [str(n) for n, i in enumerate(ids, start=2) if not i]
    if blank:
        raise MedvitError.at(path, f"empty id on line(s) {_names(blank)}")


def read_predictions_csv(path: str | Path) -> Predictions:
    """Read a predictions CSV (`write_predictions_csv`'s columns).

    Raises:
        MedvitError: Missing file, no `id` or no `p_<class>` columns, a probability that is
            not a finite number (its line named), duplicate or empty ids.
    """
    path = Path(path)
    header, rows = _read_table(path)
    prob_cols = [h for h in header if h.startswith(PROB_PREFIX) and len(h) > len(PROB_PREFIX)]
    if "id" not in header or not prob_cols:
        raise MedvitError.at(path, f"not a predictions CSV (needs id and p_<class> columns; header: {', '.join(header)})")
    ids = [row["id"] for row in rows]
    _unique_ids(path, ids)
    probs = np.empty((len(rows), len(prob_cols)), dtype=np.float64)
    for n, row in enumerate(rows):
        try:
            probs[n] = [float(row[c]) for c in prob_cols]
        except ValueError:
            raise MedvitError.at(path, f"line {n + 2}: a probability is not a number") from None
    if not np.isfinite(probs).all():
        line = int(np.argwhere(~np.isfinite(probs))[0, 0]) + 2
        raise MedvitError.at(path, f"line {line}: a probability is not finite")
    paths = [row["path"] for row in rows] if "path" in header else None
    return Predictions(ids=ids, probs=probs, classes=[c[len(PROB_PREFIX) :] for c in prob_cols], paths=paths)


def read_truth_csv(path: str | Path) -> dict[str, str]:
    """Read a ground-truth CSV: `label` (a class name) and `id` (else `path`) per row.

    Returns:
        id -> class name, in file order.

    Raises:
        MedvitError: Missing file, no `label` column, neither `id` nor `path`, empty
            labels or ids, duplicate ids.
    """
    path = Path(path)
    header, rows = _read_table(path)
    key = "id" if "id" in header else "path" if "path" in header else None
    if "label" not in header or key is None:
        raise MedvitError.at(path, f"not a ground-truth CSV (needs label and id or path; header: {', '.join(header)})")
    ids = [row[key] for row in rows]
    _unique_ids(path, ids)
    blank = [str(n) for n, row in enumerate(rows, start=2) if not row["label"]]
    if blank:
        raise MedvitError.at(path, f"empty label on line(s) {_names(blank)}")
    return {row[key]: row["label"] for row in rows}


def match_truth(
    predictions: Predictions, truth: dict[str, str], predictions_path: Path | str = "predictions", truth_path: Path | str = "truth"
) -> np.ndarray:
    """True class indices for `predictions.ids`, in their order.

    Raises:
        MedvitError: An id of the truth has no prediction, a prediction has no truth, or a
            true label is not one of the predictions' classes (up to three named).
    """
    predicted = set(predictions.ids)
    missing = [i for i in truth if i not in predicted]
    if missing:
        raise MedvitError.at(predictions_path, f"no prediction for {len(missing)} id(s) of {truth_path}: {_names(missing)}")
    extra = [i for i in predictions.ids if i not in truth]
    if extra:
        raise MedvitError.at(predictions_path, f"{len(extra)} id(s) not in {truth_path}: {_names(extra)}")
    index = {c: n for n, c in enumerate(predictions.classes)}
    unknown = sorted({truth[i] for i in predictions.ids if truth[i] not in index})
    if unknown:
        raise MedvitError.at(
            truth_path, f"label(s) not among the predicted classes ({', '.join(predictions.classes)}): {_names(unknown)}"
        )
    return np.array([index[truth[i]] for i in predictions.ids], dtype=np.int64)


def evaluate_predictions(predictions_csv: str | Path, truth_csv: str | Path) -> dict[str, Any]:
    """`classification_metrics` of a predictions CSV against a ground-truth CSV, matched by id."""
    predictions = read_predictions_csv(predictions_csv)
    labels = match_truth(predictions, read_truth_csv(truth_csv), predictions_csv, truth_csv)
    return classification_metrics(predictions.probs, labels, predictions.classes)
