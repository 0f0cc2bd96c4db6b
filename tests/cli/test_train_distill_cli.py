"""`medvit train --teacher`, and the plain U-Net through `medvit train` / `medvit segment` (3D and 2D slabs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from medvit.cli.main import main
from medvit.pipelines.checkpoint import load_checkpoint, read_card, save_checkpoint
from medvit.pipelines.phantom import write_phantom_dataset

STUDENT = [
    "--model", "unetr_tiny", "--model-arg", "feature_size=4", "--model-arg", "skip_indices=[0,1,2]",
    "--model-arg", 'encoder_args={"embed_dim": 32, "depth": 3, "num_heads": 2}',
    "--patch-size", "32", "32", "32", "--spacing", "4", "4", "4", "-q",
]
TEACHER = [
    "--model", "unet_nnunet_3d", "--model-arg", "features=[4,8,8]",
    "--patch-size", "32", "32", "32", "--spacing", "4", "4", "4", "-q",
]


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 2, seed=9, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    res = run(["train", dataset, "-o", out, *TEACHER, "--max-steps", "1", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    return out / "best.safetensors"


def test_unet_teacher_trains_and_segments(tmp_path, teacher, phantom_scan) -> None:
    assert read_card(teacher).model_name == "unet_nnunet_3d"
    img, _ = phantom_scan
    res = run(["segment", img, "--model", teacher, "-o", tmp_path / "seg", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "seg" / "phantom_seg.nii.gz").exists()


def test_unet_on_2d_slabs_trains_and_segments(tmp_path, dataset, phantom_scan) -> None:
    args = [
        "--model", "unet_nnunet_3d", "--model-arg", "spatial_dims=2", "--model-arg", "features=[4,8,8]",
        "--patch-size", "32", "32", "1", "--slab", "3", "--spacing", "4", "4", "4", "-q",
    ]
    res = run(["train", dataset, "-o", tmp_path / "run", *args, "--max-steps", "1", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    card = read_card(tmp_path / "run" / "best.safetensors")
    assert card.slicing == {"axis": 2, "slab": 3} and card.model_args["in_chans"] == 3
    img, _ = phantom_scan
    res = run(["segment", img, "--model", tmp_path / "run" / "best.safetensors", "-o", tmp_path / "seg", "-q"])
    assert res.exit_code == 0, res.output


def test_train_with_teacher_then_segment(tmp_path, dataset, teacher, phantom_scan) -> None:
    run_dir = tmp_path / "run"
    res = run(["train", dataset, "-o", run_dir, *STUDENT, "--teacher", teacher, "--distill-weight", "0.4",
               "--max-steps", "2", "--batch-size", "1"])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output
    card = read_card(run_dir / "best.safetensors")
    assert card.model_name == "unetr_tiny"
    assert card.extra["distillation"] == {"teacher": "best.safetensors", "weight": 0.4}
    img, _ = phantom_scan
    res = run(["segment", img, "--model", run_dir / "best.safetensors", "-o", tmp_path / "seg", "-q"])
    assert res.exit_code == 0, res.output


def test_teacher_with_other_labels_is_refused_in_one_line(tmp_path, dataset, teacher) -> None:
    model, card = load_checkpoint(teacher)
    labels = {k: {**v, "name": f"other_{v['name']}"} for k, v in card.labels.items()}
    other = save_checkpoint(model, replace(card, labels=labels), tmp_path / "other.safetensors")
    res = run(["train", dataset, "-o", tmp_path / "run", *STUDENT, "--teacher", other, "--max-steps", "1"])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert lines[0].startswith(f"Error: {other}: cannot teach this run: its labels") and "other_liver" in lines[0]
    assert not (tmp_path / "run" / "last.safetensors").exists()
