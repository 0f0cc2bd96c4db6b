"""Every registered segmentation model trains a few steps and segments a volume via the CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import medvit
from medvit.cli.main import main
from medvit.pipelines.checkpoint import load_checkpoint, read_card
from medvit.pipelines.phantom import write_phantom_dataset
from tiny_configs import tiny_overrides

SEGMENTATION = medvit.list_models(kind="volume")
SET_BY_THE_PIPELINE = ("img_size", "num_classes", "in_chans")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 2, seed=5, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


def _cli(args) -> str:
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _model_options(name: str) -> tuple[list[str], int]:
    tiny = tiny_overrides(name)
    with torch.device("meta"):
        dims = medvit.create_model(name, **tiny).spatial_dims
    size = tiny.get("img_size", 32)
    size = [size] * dims if isinstance(size, int) else list(size)
    opts = ["--model", name, "--patch-size", *(size if dims == 3 else [*size, 1])]
    for key, value in tiny.items():
        if key not in SET_BY_THE_PIPELINE:
            opts += ["--model-arg", f"{key}={json.dumps(value)}"]
    return opts, dims


def test_there_are_2d_and_3d_segmentation_models() -> None:
    assert "unetr_base" in SEGMENTATION
    assert len(SEGMENTATION) >= 3


@pytest.mark.parametrize("name", SEGMENTATION)
def test_train_then_segment(tmp_path, dataset, phantom_scan, name: str) -> None:
    opts, dims = _model_options(name)
    slab = ["--slab", "3"] if dims == 2 else []
    run_dir = tmp_path / "run"
    out = _cli(["train", dataset, "-o", run_dir, *opts, *slab, "--spacing", 4, 4, 4, "--max-steps", 2,
                "--batch-size", 2, "--val-fraction", 0, "-q"])
    assert "trained 2 steps" in out
    model, card = load_checkpoint(run_dir / "last.safetensors")  # strict: every weight fits
    assert card.model_name == name and model.spatial_dims == dims
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if dims == 2:
        assert card.slicing == {"axis": 2, "slab": 3} and len(card.patch_size) == 2
    else:
        assert card.slicing is None and len(card.patch_size) == 3
    img, _ = phantom_scan
    _cli(["segment", img, "--model", run_dir / "last.safetensors", "-o", tmp_path / "seg", "-q"])
    mask = nib.load(tmp_path / "seg" / "phantom_seg.nii.gz")
    source = nib.load(img)
    assert mask.shape == source.shape
    assert (mask.affine == source.affine).all()
    # a label map: integers, only background and the checkpoint's own labels
    values = np.asarray(mask.dataobj)
    assert np.issubdtype(values.dtype, np.integer)
    assert set(np.unique(values).tolist()) <= {0, *card.labels}


def test_2d_unetr_on_coronal_slices(tmp_path, dataset, phantom_scan) -> None:
    """Any 2D-capable model (here UNETR with `spatial_dims=2`) trains on slices of another axis."""
    run_dir = tmp_path / "run"
    args = ["--model", "unetr_tiny", "--model-arg", "spatial_dims=2", "--model-arg", "feature_size=4",
            "--model-arg", "skip_indices=[0,1,2]",
            "--model-arg", 'encoder_args={"embed_dim": 32, "depth": 3, "num_heads": 2}']
    out = _cli(["train", dataset, "-o", run_dir, *args, "--patch-size", 32, 1, 32, "--slice-axis", "coronal",
                "--spacing", 4, 4, 4, "--max-steps", 2, "--batch-size", 2, "--val-fraction", 0, "-q"])
    assert "trained 2 steps" in out
    card = read_card(run_dir / "last.safetensors")
    assert card.slicing == {"axis": 1, "slab": 1} and card.patch_size == (32, 32)
    img, _ = phantom_scan
    out = _cli(["segment", img, "--model", run_dir / "last.safetensors", "-o", tmp_path / "seg"])
    assert "2D on coronal slices" in out
    assert nib.load(tmp_path / "seg" / "phantom_seg.nii.gz").shape == nib.load(img).shape
