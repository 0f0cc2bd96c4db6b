"""`medvit segment` and `medvit train` through click, including every bad input."""

from __future__ import annotations

import json
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from medvit.cli.main import main
from medvit.pipelines.checkpoint import load_checkpoint, read_card
from medvit.pipelines.phantom import write_phantom_dataset

TINY_ARGS = [
    "--model", "unetr_tiny", "--model-arg", "feature_size=4", "--model-arg", "skip_indices=[0,1,2]",
    "--model-arg", 'encoder_args={"embed_dim": 32, "depth": 3, "num_heads": 2}',
    "--patch-size", "32", "32", "32", "--spacing", "4", "4", "4", "-q",
]


def run(args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def assert_user_error(result, *fragments) -> None:
    assert result.exit_code != 0
    out = result.output.strip()
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, out
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def test_help_lists_commands() -> None:
    out = run(["--help"]).output
    for cmd in ("segment", "train", "preprocess", "evaluate", "models", "info"):
        assert cmd in out


def test_segment_cli(tmp_path, tiny_checkpoint, phantom_scan) -> None:
    img, _ = phantom_scan
    res = run(["segment", img, "--model", tiny_checkpoint, "-o", tmp_path, "--preview", "--overlap", "0.25"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "phantom_seg.nii.gz").exists() and (tmp_path / "phantom_preview.png").exists()
    assert "liver" in json.loads((tmp_path / "phantom_volumes.json").read_text())
    assert "unetr_tiny" in res.output


def test_segment_folder_of_scans(tmp_path, tiny_checkpoint, phantom_scan) -> None:
    img, lab = phantom_scan
    res = run(["segment", img.parent, "--model", tiny_checkpoint, "-o", tmp_path / "out", "-q"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz")) == [
        "phantom_labels_seg.nii.gz", "phantom_seg.nii.gz"
    ]


@pytest.fixture()
def bad_files(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "empty.nii.gz").write_bytes(b"")
    (d / "text.nii.gz").write_text("not an image\n")
    good = nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4))
    nib.save(good, d / "good.nii.gz")
    raw = (d / "good.nii.gz").read_bytes()
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.int16), np.eye(4)), d / "four_d.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.int16), np.eye(4)), d / "two_d.nii.gz")
    nan = np.zeros((8, 8, 8), np.float32)
    nan[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), d / "nan.nii.gz")
    (tmp_path / "emptydir").mkdir()
    return d


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("missing.nii.gz", "missing.nii.gz"),
        ("empty.nii.gz", "empty.nii.gz"),
        ("text.nii.gz", "text.nii.gz"),
        ("truncated.nii.gz", "truncated.nii.gz"),
        ("four_d.nii.gz", "four_d.nii.gz"),
        ("two_d.nii.gz", "two_d.nii.gz"),
        ("nan.nii.gz", "nan.nii.gz"),
        ("../emptydir", "emptydir"),
    ],
)
def test_segment_bad_inputs(tmp_path, bad_files, tiny_checkpoint, name, fragment) -> None:
    out = tmp_path / "out"
    res = run(["segment", bad_files / name, "--model", tiny_checkpoint, "-o", out, "-q"])
    assert_user_error(res, fragment)
    assert not out.exists() or not any(out.iterdir())


def test_pickle_checkpoint_is_refused_never_loaded(tmp_path, phantom_scan) -> None:
    img, _ = phantom_scan
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch_file = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(1)}, torch_file)
    raw_pickle = tmp_path / "model.safetensors"
    raw_pickle.write_bytes(pickle.dumps(Evil()))
    for ckpt in (torch_file, raw_pickle):
        res = run(["segment", img, "--model", ckpt, "-o", tmp_path / "out"])
        assert_user_error(res, ckpt.name)
    assert not marker.exists()
    res = run(["segment", img, "--model", tmp_path / "nope.safetensors", "-o", tmp_path / "out"])
    assert_user_error(res, "nope.safetensors")


def test_segment_keeps_existing_output_when_a_later_step_fails(tmp_path, tiny_checkpoint, phantom_scan, bad_files) -> None:
    img, _ = phantom_scan
    out = tmp_path / "out"
    assert run(["segment", img, "--model", tiny_checkpoint, "-o", out, "-q"]).exit_code == 0
    before = (out / "phantom_seg.nii.gz").read_bytes()
    res = run(["segment", img, "--model", tiny_checkpoint, "-o", out, "--labels", "lung", "-q"])
    assert_user_error(res, "lung")
    assert (out / "phantom_seg.nii.gz").read_bytes() == before
    assert not list(out.glob(".tmp-*"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 2, seed=9, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


def test_train_cli_then_segment(tmp_path, dataset, phantom_scan) -> None:
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    res = run(["train", dataset, "-o", run_dir, *TINY_ARGS, "--epochs", "1", "--batch-size", "1",
               "--workers", "1", "--cache-dir", cache])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "trained 1 steps" in res.output or "trained 2 steps" in res.output
    # every case preprocessed once into the cache; a second run reads them, writes none
    filled = {p.name: (p / "image.npy").stat().st_mtime_ns for p in cache.iterdir()}
    assert len(filled) == 2 and all(n.isalnum() for n in filled)
    res = run(["train", dataset, "-o", tmp_path / "run2", *TINY_ARGS, "--max-steps", "1", "--workers", "0",
               "--cache-dir", cache])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert {p.name: (p / "image.npy").stat().st_mtime_ns for p in cache.iterdir()} == filled
    img, _ = phantom_scan
    res = run(["segment", img, "--model", run_dir / "best.safetensors", "-o", tmp_path / "seg", "-q"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--model", "unetr_nope"], "unetr_nope"),
        (["--patch-size", "30", "32", "32"], "does not divide"),
        (["--workers", "-1"], "--workers must be >= 0"),
    ],
)
def test_train_bad_settings(tmp_path, dataset, extra, fragment) -> None:
    res = run(["train", dataset, "-o", tmp_path / "run", *TINY_ARGS, *extra, "--max-steps", "1"])
    assert_user_error(res, fragment)
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_train_missing_dataset(tmp_path) -> None:
    res = run(["train", tmp_path / "nothing.json", "-o", tmp_path / "run", *TINY_ARGS])
    assert_user_error(res, "nothing.json")


def test_train_deep_supervision_then_segment(tmp_path, dataset, phantom_scan) -> None:
    run_dir = tmp_path / "run"
    res = run(["train", dataset, "-o", run_dir, *TINY_ARGS, "--deep-supervision", "--max-steps", "2", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output
    assert read_card(run_dir / "best.safetensors").model_args["deep_supervision"] is True
    model, _ = load_checkpoint(run_dir / "best.safetensors")  # strict: the aux heads load too
    assert len(model.aux_heads) == 2
    img, _ = phantom_scan
    res = run(["segment", img, "--model", run_dir / "best.safetensors", "-o", tmp_path / "seg", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "seg" / "phantom_seg.nii.gz").exists()


def test_train_deep_supervision_refused_for_a_single_scale_decoder(tmp_path, dataset) -> None:
    args = ["--model", "segformer_b0", "--patch-size", "32", "32", "1", "-q", "--max-steps", "1"]
    res = run(["train", dataset, "-o", tmp_path / "run", *args, "--deep-supervision"])
    assert_user_error(res, "--deep-supervision needs a decoder with several scales; segformer_b0 has one")
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_train_options_reach_the_training_config(tmp_path, dataset, monkeypatch) -> None:
    import medvit.pipelines.train as training

    seen = {}

    def capture(cfg):
        seen["cfg"] = cfg
        raise training.MedvitError("stopped after reading the options")

    monkeypatch.setattr(training, "train", capture)
    res = run(["train", dataset, "-o", tmp_path / "run", *TINY_ARGS, "--weight-decay", "0.05", "--lr", "3e-4",
               "--workers", "3", "--cache-dir", tmp_path / "c"])  # fmt: skip
    assert_user_error(res, "stopped after reading the options")
    assert seen["cfg"].weight_decay == 0.05 and seen["cfg"].lr == 3e-4
    assert seen["cfg"].workers == 3 and seen["cfg"].cache_dir == tmp_path / "c"


@pytest.fixture(scope="module")
def three_cases(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds3"), 3, seed=5, shape=(32, 32, 16), spacing=(4.0, 4.0, 8.0))


def test_train_cli_cross_validation_fold(tmp_path, three_cases) -> None:
    from medvit.pipelines.splits import make_folds

    folds = make_folds(["case_000", "case_001", "case_002"], 3, seed=0)
    run_dir = tmp_path / "fold1"
    res = run(["train", three_cases, "-o", run_dir, *TINY_ARGS, "--folds", "3", "--fold", "1", "--max-steps", "1",
               "--batch-size", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((run_dir / "splits.json").read_text()) == folds
    for name in ("best", "last"):
        assert read_card(run_dir / f"{name}.safetensors").extra["split"] == {"fold": 1, "folds": 3, "val": folds[1]["val"]}
    # the stored split, given back as a file (nnU-Net's splits_final.json format), splits the same way
    res = run(["train", three_cases, "-o", tmp_path / "all", *TINY_ARGS, "--split-file", run_dir / "splits.json",
               "--fold", "all", "--max-steps", "1", "--batch-size", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    split = read_card(tmp_path / "all" / "last.safetensors").extra["split"]
    assert split == {"fold": "all", "folds": 3, "val": ["case_000", "case_001", "case_002"]}
    assert json.loads((tmp_path / "all" / "splits.json").read_text()) == folds


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--folds", "4", "--fold", "0"], "--folds 4 needs at least 4 cases; the dataset has 3"),
        (["--folds", "3", "--fold", "3"], "--fold 3 is out of range for 3 folds (0..2 or all)"),
        (["--folds", "3", "--fold", "0", "--val-fraction", "0.2"], "--val-fraction holds out random cases"),
        (["--fold", "one"], "--fold must be a fold number or 'all'"),
        (["--split-file", "splits_final.json", "--fold", "0"], "splits_final.json: no such split file"),
    ],
)
def test_train_cli_bad_folds(tmp_path, three_cases, extra, fragment) -> None:
    res = run(["train", three_cases, "-o", tmp_path / "run", *TINY_ARGS, *extra, "--max-steps", "1"])
    assert_user_error(res, fragment)
    assert not (tmp_path / "run" / "splits.json").exists()
