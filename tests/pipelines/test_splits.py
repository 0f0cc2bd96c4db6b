"""Cross-validation folds: nnU-Net's k-fold split of the cases, split files, and runs that use them."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from medvit.pipelines.checkpoint import read_card
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.phantom import write_phantom_dataset
from medvit.pipelines.splits import SPLITS_FILE, make_folds, read_splits, run_split
from medvit.pipelines.train import TrainConfig, Trainer, train

from helpers import TINY_UNETR_ARGS

IDS = [f"liver_{i}" for i in range(11)]
MODEL_ARGS = {k: v for k, v in TINY_UNETR_ARGS.items() if k not in ("img_size", "num_classes", "in_chans")}
PHANTOM_CASES = ["case_000", "case_001", "case_002"]


def _one_line_error(fragments: tuple[str, ...], fn, *args, **kwargs) -> str:
    with pytest.raises(MedvitError) as exc:
        fn(*args, **kwargs)
    message = str(exc.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.mark.parametrize(("n", "k"), [(2, 2), (5, 5), (7, 3), (11, 5), (23, 4)])
def test_folds_partition_the_cases(n: int, k: int) -> None:
    ids = [f"c{i:02d}" for i in range(n)]
    folds = make_folds(ids, k, seed=3)
    assert len(folds) == k
    vals = [c for f in folds for c in f["val"]]
    assert sorted(vals) == ids  # every case validated exactly once across the folds
    for f in folds:
        assert not set(f["train"]) & set(f["val"])
        assert sorted(f["train"] + f["val"]) == ids
        assert f["train"] == sorted(f["train"]) and f["val"] == sorted(f["val"])
    sizes = [len(f["val"]) for f in folds]
    # as KFold: the first n % k folds hold one case more
    assert sizes == [n // k + 1] * (n % k) + [n // k] * (k - n % k)


def test_folds_are_default_rng_permutation_cut_in_contiguous_chunks() -> None:
    order = np.random.default_rng(7).permutation(len(IDS))  # IDS sorted as strings: liver_0, liver_1, liver_10, ...
    ids = sorted(IDS)
    expected = [sorted(ids[i] for i in chunk) for chunk in np.array_split(order, 5)]
    assert [f["val"] for f in make_folds(IDS, 5, seed=7)] == expected


def test_folds_depend_on_the_seed_and_the_set_of_cases_only() -> None:
    shuffled = list(IDS)
    random.Random(1).shuffle(shuffled)
    assert make_folds(shuffled, 5, seed=0) == make_folds(IDS, 5, seed=0) == make_folds(tuple(IDS), 5, seed=0)
    assert make_folds(IDS, 5, seed=0) != make_folds(IDS, 5, seed=1)


def test_make_folds_errors() -> None:
    _one_line_error(("--folds 12", "at least 12 cases", "has 11"), make_folds, IDS, 12)
    _one_line_error(("--folds", "at least 2"), make_folds, IDS, 1)
    _one_line_error(("twice", "liver_1"), make_folds, [*IDS, "liver_1"], 3)


def _nnunet_splits(path: Path) -> Path:
    """A splits_final.json as nnU-Net v2 writes it (5 folds, indented, sorted ids)."""
    folds = [
        {"train": sorted(set(IDS[:10]) - set(IDS[k * 2 : k * 2 + 2])), "val": sorted(IDS[k * 2 : k * 2 + 2])}
        for k in range(5)
    ]
    path.write_text(json.dumps(folds, sort_keys=False, indent=4))
    return path


def test_reads_nnunet_splits_final_json(tmp_path: Path) -> None:
    path = _nnunet_splits(tmp_path / "splits_final.json")
    splits = read_splits(path, IDS)
    assert splits == json.loads(path.read_text())
    split = run_split(IDS, fold=3, split_file=path)
    assert split.val == ["liver_6", "liver_7"] and "liver_10" not in split.train  # a case the file leaves out
    assert split.fold == 3 and split.folds == 5 and split.splits == splits
    assert split.record() == {"fold": 3, "folds": 5, "val": ["liver_6", "liver_7"]}
    # fold 'all' trains and validates on every case of the dataset
    every = run_split(IDS, fold="all", split_file=path)
    assert every.train == every.val == sorted(IDS) and every.record()["folds"] == 5


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[{", "not a readable JSON split file"),
        ('{"train": [], "val": []}', "expected a list of"),
        ("[]", "expected a list of"),
        ('[{"train": ["liver_0"], "val": [3]}]', "fold 0: expected a list of"),
        ('[{"train": ["liver_0"], "val": ["liver_1"]}, {"train": ["liver_0"], "val": ["lung_4"]}]',
         "fold 1 names cases that are not in the dataset: lung_4"),
        ('[{"train": ["liver_0", "liver_1"], "val": ["liver_1"]}]', "fold 0 has cases in both train and val: liver_1"),
        ('[{"train": ["liver_0"], "val": []}]', "fold 0 has no val cases"),
        ('[{"train": ["liver_0", "liver_0"], "val": ["liver_1"]}]', "lists a case twice in train: liver_0"),
    ],
)
def test_bad_split_files(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "splits_final.json"
    path.write_text(content)
    message = _one_line_error((fragment,), read_splits, path, IDS)
    assert message.startswith(f"{path}: ")


def test_split_file_with_too_few_folds_or_missing(tmp_path: Path) -> None:
    path = _nnunet_splits(tmp_path / "splits_final.json")
    message = _one_line_error(("has 5 folds", "--fold 5 needs at least 6"), run_split, IDS, fold=5, split_file=path)
    assert message.startswith(f"{path}: ")
    _one_line_error((str(tmp_path / "nope.json"), "no such split file"), run_split, IDS, fold=0, split_file=tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"folds": 3, "fold": 0, "val_fraction": 0.3}, "--val-fraction holds out random cases"),
        ({"folds": 3, "val_fraction": 0.2}, "--val-fraction holds out random cases"),
        ({"folds": 3}, "need --fold K"),
        ({"split_file": "splits_final.json"}, "need --fold K"),
        ({"folds": 3, "fold": 3}, "--fold 3 is out of range for 3 folds (0..2 or all)"),
        ({"fold": 5}, "--fold 5 is out of range for 5 folds"),
        ({"folds": 3, "fold": -1}, "--fold -1 is out of range"),
        ({"fold": "last"}, "--fold must be a fold number or 'all', got 'last'"),
        ({"folds": 1, "fold": 0}, "--folds must be a whole number of at least 2"),
        ({"folds": 12, "fold": 0}, "--folds 12 needs at least 12 cases"),
        ({"folds": 3, "fold": 0, "split_file": "splits_final.json"}, "--split-file sets the folds"),
    ],
)
def test_contradicting_or_out_of_range_options(options: dict, fragment: str) -> None:
    _one_line_error((fragment,), run_split, IDS, **options)


def test_run_split_options() -> None:
    split = run_split(IDS, folds=4, fold="1", seed=2)  # the CLI passes the fold as text
    assert split.splits == make_folds(IDS, 4, 2) and split.val == split.splits[1]["val"] and split.fold == 1
    assert run_split(IDS, fold=0).splits == make_folds(IDS, 5, 0)  # nnU-Net's 5 folds by default
    alone = run_split(IDS, fold="all")
    assert alone.splits == [{"train": sorted(IDS), "val": sorted(IDS)}]
    assert alone.record() == {"fold": "all", "folds": None, "val": sorted(IDS)}
    assert run_split(IDS, folds=3, fold="ALL").record()["folds"] == 3


def test_held_out_fraction_is_the_split_of_before_folds() -> None:
    held = run_split(IDS, val_fraction=0.3, seed=4)
    cases = list(IDS)
    random.Random(4).shuffle(cases)
    assert (held.train, held.val) == (cases[3:], cases[:3])
    assert held.record() == {"fold": None, "folds": None, "val": sorted(cases[:3])}
    assert held.splits == [{"train": sorted(cases[3:]), "val": sorted(cases[:3])}]
    assert len(run_split(IDS).val) == 2  # 0.2 by default
    one = run_split(["a"])
    assert one.train == one.val == ["a"]


# -- training runs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 3, seed=5, shape=(32, 32, 16), spacing=(4.0, 4.0, 8.0))


def _config(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=dataset, out_dir=out, model="unetr_tiny", model_args=MODEL_ARGS, max_steps=1, patch_size=(32, 32, 32),
        spacing=(4.0, 4.0, 4.0), batch_size=1, samples_per_volume=1, progress=False,
    )
    return TrainConfig(**{**base, **kw})


def _validated_files(trainer: Trainer) -> list[str]:
    return sorted(Path(case.image).name for case in trainer.val_cases)


def test_fold_all_validates_on_every_case(dataset: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(dataset, tmp_path, folds=3, fold="all"))
    assert _validated_files(trainer) == [f"{c}.nii.gz" for c in PHANTOM_CASES]
    assert len(trainer.train_loader.dataset) == 3
    fold = Trainer(_config(dataset, tmp_path, folds=3, fold=2))
    assert _validated_files(fold) == [f"{c}.nii.gz" for c in make_folds(PHANTOM_CASES, 3, 0)[2]["val"]]
    assert len(fold.train_loader.dataset) == 2


def test_resume_refuses_another_split(dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_config(dataset, run, folds=3, fold=1))
    assert json.loads((run / SPLITS_FILE).read_text()) == make_folds(PHANTOM_CASES, 3, 0)
    for other in ({"folds": 3, "fold": 2}, {"folds": 3, "fold": 1, "seed": 1}, {}):
        message = _one_line_error(("last_state.pt", "other validation cases"), Trainer, _config(dataset, run, resume=True, **other))
        assert "resume with the same --fold" in message
    # the stored split is checked too: a hand-edited splits.json no longer matches the run's options
    (run / SPLITS_FILE).write_text(json.dumps(make_folds(PHANTOM_CASES, 3, 0)[::-1]))
    _one_line_error((str(run / SPLITS_FILE), "differs from the one stored"), Trainer, _config(dataset, run, folds=3, fold=1, resume=True))
    (run / SPLITS_FILE).write_text(json.dumps(make_folds(PHANTOM_CASES, 3, 0)))
    result = train(_config(dataset, run, folds=3, fold=1, resume=True, max_steps=2))
    assert result.steps == 2
    assert read_card(run / "last.safetensors").extra["split"] == {"fold": 1, "folds": 3, "val": make_folds(PHANTOM_CASES, 3, 0)[1]["val"]}


def test_cards_without_a_split_still_load(tiny_checkpoint: Path) -> None:
    card = read_card(tiny_checkpoint)  # written without "split", as every card before folds
    assert "split" not in card.extra and card.model_name == "unetr_tiny"
