"""Which cases a training run learns from and which it validates on.

nnU-Net's cross-validation: the sorted case ids are permuted by `numpy.random.default_rng(seed)`
and cut into `folds` contiguous chunks of near-equal size (the first `n % folds` one case
larger, as scikit-learn's `KFold(shuffle=True)`); fold K validates on chunk K and trains on
the rest. The split depends on the seed and the set of case ids alone, so every fold's run
(on any machine) draws the same one and no case is validated by a model that trained on it.
Fold `"all"` trains on every case and, as nnU-Net, validates on the training cases.

A split is stored as nnU-Net's `splits_final.json`: a list of `{"train": [...], "val": [...]}`,
one per fold, of case ids as the dataset names them (`Case.name`), so nnU-Net's own file
can be read (`read_splits`) and a run's `splits.json` can be given to nnU-Net.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvit.pipelines.errors import MedvitError, short_reason

__all__ = [
    "DEFAULT_FOLDS",
    "DEFAULT_VAL_FRACTION",
    "SPLITS_FILE",
    "RunSplit",
    "check_split_options",
    "make_folds",
    "read_splits",
    "run_split",
]

SPLITS_FILE = "splits.json"
DEFAULT_FOLDS = 5
DEFAULT_VAL_FRACTION = 0.2
_SHOWN = 3  # case ids named in an error before "and N more"

Split = dict[str, list[str]]


def _listed(ids: Sequence[str]) -> str:
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(ids[:_SHOWN]) + more


def make_folds(case_ids: Sequence[str], folds: int = DEFAULT_FOLDS, seed: int = 0) -> list[Split]:
    """nnU-Net's k-fold split of the cases.

    Args:
        case_ids: Case ids, in any order (they are sorted first).
        folds: Number of folds, 2 or more and at most the number of cases.
        seed: Seed of the permutation.

    Returns:
        One `{"train": [...], "val": [...]}` per fold, each list sorted; the `val` lists
        partition the cases and differ in length by at most one.

    Raises:
        MedvitError: Fewer than 2 folds, more folds than cases, or a case id twice.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        twice = sorted({c for c in ids if ids.count(c) > 1})
        raise MedvitError(f"case ids must be distinct to split them; twice: {_listed(twice)}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise MedvitError(f"--folds must be a whole number of at least 2, got {folds!r}")
    if folds > len(ids):
        raise MedvitError(f"--folds {folds} needs at least {folds} cases; the dataset has {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    splits = []
    for chunk in np.array_split(order, folds):
        held = {int(i) for i in chunk}
        splits.append({"train": [c for i, c in enumerate(ids) if i not in held], "val": [ids[i] for i in sorted(held)]})
    return splits


def read_splits(path: str | Path, case_ids: Sequence[str]) -> list[Split]:
    """Read a split file (nnU-Net's `splits_final.json`, or a run's `splits.json`).

    Args:
        path: The file.
        case_ids: The dataset's case ids; every id the file names must be one of them
            (cases the file leaves out are simply not used).

    Returns:
        The folds, each `{"train": [...], "val": [...]}` as the file orders them.

    Raises:
        MedvitError: One line naming the file: unreadable, not JSON, not a list of
            train/val lists of ids, an unknown case, a case in both train and val or
            twice in one list, or a fold without training or validation cases.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedvitError.at(path, "no such split file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MedvitError.at(path, f"not a readable JSON split file ({short_reason(e)})") from None
    shape = 'expected a list of {"train": [case ids], "val": [case ids]}, one per fold (nnU-Net\'s splits_final.json)'
    if not isinstance(data, list) or not data:
        raise MedvitError.at(path, shape)
    known = set(case_ids)
    splits = []
    for k, fold in enumerate(data):
        if not (isinstance(fold, dict) and {"train", "val"} <= set(fold)
                and all(isinstance(fold[s], list) and all(isinstance(c, str) for c in fold[s]) for s in ("train", "val"))):  # fmt: skip
            raise MedvitError.at(path, f"fold {k}: {shape}")
        train, val = list(fold["train"]), list(fold["val"])
        problem = _fold_problem(train, val, known)
        if problem:
            raise MedvitError.at(path, f"fold {k} {problem}")
        splits.append({"train": train, "val": val})
    return splits


def _fold_problem(train: list[str], val: list[str], known: set[str]) -> str | None:
    unknown = sorted({c for c in train + val if c not in known})
    if unknown:
        return f"names cases that are not in the dataset: {_listed(unknown)}"
    both = sorted(set(train) & set(val))
    if both:
        return f"has cases in both train and val: {_listed(both)}"
    for name, ids in (("train", train), ("val", val)):
        if not ids:
            return f"has no {name} cases"
        if len(set(ids)) != len(ids):
            return f"lists a case twice in {name}: {_listed(sorted({c for c in ids if ids.count(c) > 1}))}"
    return None


@dataclass(frozen=True)
class RunSplit:
    """The split one training run uses.

    Attributes:
        splits: What the run's `splits.json` holds (every fold, nnU-Net's format).
        fold: The run's fold: an index into `splits`, `"all"`, or None for a run that
            held out `--val-fraction` of the cases.
        folds: The number of cross-validation folds (`len(splits)`), or None when the run
            is not one of a cross-validation (a held-out fraction, or fold `"all"` alone).
        train: Case ids trained on.
        val: Case ids validated on (the training cases for fold `"all"`).
    """

    splits: list[Split]
    fold: int | str | None
    folds: int | None
    train: list[str]
    val: list[str]

    def record(self) -> dict[str, Any]:
        """What the model card keeps: the fold, the number of folds and the validation cases."""
        return {"fold": self.fold, "folds": self.folds, "val": sorted(self.val)}


def _parse_fold(fold: int | str) -> int | str:
    if isinstance(fold, str):
        if fold.strip().lower() == "all":
            return "all"
        try:
            return int(fold)
        except ValueError:
            pass
    elif isinstance(fold, (int, np.integer)) and not isinstance(fold, bool):
        return int(fold)
    raise MedvitError(f"--fold must be a fold number or 'all', got {fold!r}")


def check_split_options(
    folds: int | None = None,
    fold: int | str | None = None,
    split_file: str | Path | None = None,
    val_fraction: float | None = None,
) -> int | str | None:
    """Check the split options of `medvit train` alone (before any data is read).

    Returns:
        The fold: an index, `"all"` or None (a held-out fraction).

    Raises:
        MedvitError: One line: options that contradict each other, fewer than 2 folds, or a
            fold out of range of `folds` (that of a split file is checked on reading it).
    """
    if val_fraction is not None and (folds is not None or fold is not None or split_file is not None):
        raise MedvitError(
            "--val-fraction holds out random cases and --folds/--fold/--split-file choose a fold; give one or the other"
        )
    if fold is None:
        if folds is not None or split_file is not None:
            raise MedvitError("--folds and --split-file need --fold K (a fold number) or --fold all")
        return None
    if split_file is not None and folds is not None:
        raise MedvitError("--split-file sets the folds; give it without --folds")
    if folds is not None and (isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2):
        raise MedvitError(f"--folds must be a whole number of at least 2, got {folds!r}")
    fold = _parse_fold(fold)
    n = DEFAULT_FOLDS if folds is None else int(folds)
    if fold != "all" and (fold < 0 or (split_file is None and fold >= n)):
        raise MedvitError(f"--fold {fold} is out of range for {n} folds (0..{n - 1} or all)")
    return fold


def run_split(
    case_ids: Sequence[str],
    *,
    folds: int | None = None,
    fold: int | str | None = None,
    split_file: str | Path | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
) -> RunSplit:
    """The split of a training run from its options (those of `medvit train`).

    Without `fold`, `folds` or `split_file`, a random `val_fraction` (0.2) of the cases is
    held out (all cases validate when fewer than two, or `val_fraction` <= 0), as before
    folds existed. With `fold` K: fold K of `split_file`, or of `make_folds(case_ids,
    folds or 5, seed)`. Fold `"all"` trains and validates on every case; its `splits` are
    the file's or `--folds`' when given, else the one entry of all cases.

    Args:
        case_ids: The dataset's case ids in the dataset's order.

    Raises:
        MedvitError: One line: see `check_split_options`; more folds than cases, a bad
            split file or one with too few folds (naming it).
    """
    ids = list(case_ids)
    fold = check_split_options(folds, fold, split_file, val_fraction)
    if fold is None:
        return _held_out(ids, DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, seed)
    every = sorted(ids)
    if split_file is not None:
        splits = read_splits(split_file, ids)
    elif fold != "all" or folds is not None:
        splits = make_folds(ids, DEFAULT_FOLDS if folds is None else folds, seed)
    else:
        return RunSplit([{"train": every, "val": every}], "all", None, every, every)
    if fold == "all":
        return RunSplit(splits, "all", len(splits), every, every)
    if fold >= len(splits):
        raise MedvitError.at(split_file, f"has {len(splits)} folds; --fold {fold} needs at least {fold + 1}")
    return RunSplit(splits, fold, len(splits), list(splits[fold]["train"]), list(splits[fold]["val"]))


def _held_out(ids: list[str], val_fraction: float, seed: int) -> RunSplit:
    """A random `val_fraction` of the cases (in the dataset's order, shuffled with `seed`) for validation."""
    if len(ids) < 2 or val_fraction <= 0:
        return RunSplit([{"train": sorted(ids), "val": sorted(ids)}], None, None, list(ids), list(ids))
    shuffled = list(ids)
    random.Random(seed).shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * val_fraction))
    train, val = shuffled[n_val:], shuffled[:n_val]
    return RunSplit([{"train": sorted(train), "val": sorted(val)}], None, None, train, val)
