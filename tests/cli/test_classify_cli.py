"""Classification through the command line: train on images, volumes and clips, predict, evaluate."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medvit.pipelines.checkpoint import load_checkpoint, read_card

from helpers import cli_ok, cli_one_line_error, cli_run

TINY = ["--model-arg", "embed_dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2"]
QUICK = ["--batch-size", "4", "--device", "cpu", "-q"]


run, ok, one_line_error = cli_run, cli_ok, cli_one_line_error


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of 32x32 grey PNGs told apart by brightness (dark 40-80, bright 170-210), 12 each."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, lo in (("dark", 40), ("bright", 170)):
        (root / name).mkdir()
        for i in range(12):
            pixels = rng.integers(lo, lo + 40, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    ok(["train", images, "-o", out, "--model", "vit_tiny_patch16_224", *TINY, "--model-arg", "patch_size=8",
        "--input-size", "32x32", "--recipe", "baseline", "--max-steps", "40", "--lr", "2e-3", *QUICK])  # fmt: skip
    return out


def test_train_writes_a_classification_run(trained, images) -> None:
    card = read_card(trained / "last.safetensors")
    assert card.task == "classification" and card.label_names() == {0: "bright", 1: "dark"}
    assert card.preprocessing["kind"] == "image" and card.preprocessing["in_chans"] == 3
    assert tuple(card.patch_size) == (32, 32) and card.model_args["num_classes"] == 2
    splits = json.loads((trained / "splits.json").read_text())
    val = set(card.extra["split"]["val"])
    assert len(val) == round(24 * 0.2) and set(splits[0]["val"]) == val and val.isdisjoint(splits[0]["train"])
    assert card.extra["recipe"]["name"] == "baseline"
    # an easy task learns: brightness separates the classes on the held-out images
    assert card.extra["metrics"]["balanced_accuracy"] == 1.0, card.extra["metrics"]
    assert (trained / "best.safetensors").exists() and any((trained / "tb").iterdir())


def test_predict_and_evaluate(trained, images, tmp_path) -> None:
    preds = tmp_path / "preds.csv"
    out = ok(["predict", images, "-m", trained / "last.safetensors", "-o", preds, "-q"])
    assert "24 input(s) classified" in out
    rows = list(csv.DictReader(preds.open()))
    assert len(rows) == 24 and {r["predicted"] for r in rows} <= {"bright", "dark"}
    for r in rows:
        assert float(r["p_bright"]) + float(r["p_dark"]) == pytest.approx(1.0, abs=1e-5)
    # the CSV's probabilities are the model's on the same input, read as in training
    from medvit.pipelines.classify_data import load_item, normalise

    model, _ = load_checkpoint(trained / "last.safetensors", torch.device("cpu"))
    first = rows[0]
    x = normalise(load_item(Path(first["path"]), "image", (32, 32), 3))[None]
    with torch.no_grad():
        p = torch.softmax(model.eval()(x), -1)[0]
    assert float(first["p_bright"]) == pytest.approx(float(p[0]), abs=1e-5)
    truth = tmp_path / "truth.csv"
    truth.write_text("id,label\n" + "".join(f"{r['id']},{r['id'].split('/')[0]}\n" for r in rows))
    report = ok(["evaluate", preds, truth, "--csv", tmp_path / "per_class.csv"])
    assert "24 inputs: accuracy" in report and "macro AUROC" in report
    per_class = list(csv.DictReader((tmp_path / "per_class.csv").open()))
    assert [r["class"] for r in per_class] == ["bright", "dark"] and sum(int(r["support"]) for r in per_class) == 24


def test_sam_ema_and_distillation_through_the_cli(trained, images, tmp_path) -> None:
    sam = tmp_path / "sam"
    ok(["train", images, "-o", sam, "--model", "vit_tiny_patch16_224", *TINY, "--model-arg", "patch_size=8",
        "--input-size", "32x32", "--recipe", "deit", "--sam", "asam", "--sam-rho", "0.5", "--ema",
        "--max-steps", "3", *QUICK])  # fmt: skip
    recipe = read_card(sam / "last.safetensors").extra["recipe"]
    assert (recipe["sam"], recipe["sam_rho"], recipe["ema"]) == ("asam", 0.5, True)
    student = tmp_path / "student"
    ok(["train", images, "-o", student, "--model", "deit_tiny_distilled_patch16_224", *TINY,
        "--model-arg", "patch_size=8", "--input-size", "32x32", "--teacher", trained / "last.safetensors",
        "--max-steps", "3", *QUICK])  # fmt: skip
    card = read_card(student / "last.safetensors")
    assert card.extra["distillation"]["teacher"] == str(trained / "last.safetensors")


def test_volumes_and_clips(tmp_path) -> None:
    rng = np.random.default_rng(1)
    vols, clips = tmp_path / "vols", tmp_path / "clips"
    for c, level in (("low", 0.2), ("high", 0.8)):
        (vols / c).mkdir(parents=True)
        (clips / c).mkdir(parents=True)
        for i in range(4):
            v = (level + 0.1 * rng.standard_normal((16, 16, 16))).astype(np.float32)
            nib.save(nib.Nifti1Image(v, np.eye(4)), str(vols / c / f"{c}{i}.nii.gz"))
            np.save(clips / c / f"{c}{i}.npy", (255 * np.clip(level + 0.1 * rng.standard_normal((6, 32, 32)), 0, 1)).astype(np.uint8))
    ok(["train", vols, "-o", tmp_path / "v", "--model", "vit_tiny_patch16_224", *TINY, "--model-arg", "patch_size=8",
        "--input-size", "16x16x16", "--max-steps", "2", *QUICK])  # fmt: skip
    card = read_card(tmp_path / "v" / "last.safetensors")
    assert card.preprocessing["kind"] == "volume" and card.model_args["spatial_dims"] == 3
    ok(["predict", vols / "low", "-m", tmp_path / "v" / "last.safetensors", "-o", tmp_path / "v.csv", "-q"])
    assert len(list(csv.DictReader((tmp_path / "v.csv").open()))) == 4
    ok(["train", clips, "-o", tmp_path / "c", "--model", "timesformer_base", *TINY, "--model-arg", "patch_size=8",
        "--kind", "video", "--frames", "4", "--input-size", "32x32", "--max-steps", "2", *QUICK])  # fmt: skip
    card = read_card(tmp_path / "c" / "last.safetensors")
    assert card.preprocessing["kind"] == "video" and tuple(card.patch_size) == (4, 32, 32)
    ok(["predict", clips, "-m", tmp_path / "c" / "last.safetensors", "-o", tmp_path / "c.csv", "-q"])
    rows = list(csv.DictReader((tmp_path / "c.csv").open()))
    assert sorted(r["id"] for r in rows) == sorted(f"{c}/{c}{i}.npy" for c in ("low", "high") for i in range(4))


def test_resume_continues_the_run(images, tmp_path) -> None:
    out = tmp_path / "r"
    args = ["train", images, "-o", out, "--model", "vit_tiny_patch16_224", *TINY, "--model-arg", "patch_size=8",
            "--input-size", "32x32", "--recipe", "deit", *QUICK]  # fmt: skip
    ok([*args, "--epochs", "1"])
    first = read_card(out / "last.safetensors").extra
    ok([*args, "--epochs", "2", "--resume"])
    second = read_card(out / "last.safetensors").extra
    assert (first["epoch"], second["epoch"]) == (1, 2) and second["step"] == 2 * first["step"]


def test_errors_are_one_line(images, trained, tmp_path, tiny_checkpoint, phantom_scan) -> None:
    one_line_error(["train", images, "-o", tmp_path / "a", "--model", "unetr_tiny", *QUICK], "unetr_tiny",
                   "segmentation model")  # fmt: skip
    result = run(["train", images, "-o", tmp_path / "b", "--patch-size", "32", "32", "32", *QUICK])
    assert result.exit_code == 2 and "--patch-size only apply to segmentation datasets" in result.output
    one_line_error(["predict", images, "-m", tiny_checkpoint, "-o", tmp_path / "p.csv"], "segmentation checkpoint")
    one_line_error(["segment", phantom_scan[0], "-m", trained / "last.safetensors", "-o",
                    tmp_path / "s", "-q"], "classification checkpoint")  # fmt: skip


def test_ddp_two_cpu_processes(images, tmp_path) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medvit.cli",
           "train", str(images), "-o", str(out), "--model", "vit_tiny_patch16_224", *TINY, "--model-arg", "patch_size=8",
           "--input-size", "32x32", "--epochs", "2", *QUICK]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "config.json").read_text())
    card = read_card(out / "last.safetensors")
    # 19 training images, repeated augmentation x3 spread over 2 ranks: 10 per rank and epoch, 2 full batches of 4
    assert info["world_size"] == 2 and card.extra["epoch"] == 2 and card.extra["step"] == info["total_steps"] == 4
