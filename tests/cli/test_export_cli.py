"""`medvit export` and `medvit segment -m model.onnx` through click, on the shared real CT."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medvit.cli.main import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_segment_with_the_onnx_export_gives_the_checkpoints_mask(tmp_path, tiny_checkpoint, shared_data) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    res = run("export", tiny_checkpoint, "-o", onnx_path)
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {onnx_path} (onnx): unetr_tiny, window (1, 32, 32, 32)")
    diff = float(res.output.split("logit difference ")[1].split()[0])
    assert 0 < diff < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]

    ct = shared_data / "ct" / "example_ct_sm.nii.gz"
    res = run("segment", ct, "-m", onnx_path, "-o", tmp_path / "onnx")
    assert res.exit_code == 0, res.output
    assert "model: unetr_tiny (4 labels" in res.output  # the card, read from the ONNX metadata
    res = run("segment", ct, "-m", tiny_checkpoint, "-o", tmp_path / "torch", "--precision", "fp32", "-q")
    assert res.exit_code == 0, res.output
    masks = [nib.load(tmp_path / d / "example_ct_sm_seg.nii.gz") for d in ("onnx", "torch")]
    assert np.allclose(masks[0].affine, masks[1].affine)
    a, b = (np.asarray(m.dataobj) for m in masks)
    assert a.shape == b.shape == nib.load(ct).shape
    assert np.unique(b).size > 2  # the random model paints several labels: the comparison can fail
    assert (a == b).mean() >= 0.999  # only argmax ties of fp32 rounding may differ
    vols = [json.loads((tmp_path / d / "example_ct_sm_volumes.json").read_text()) for d in ("onnx", "torch")]
    assert vols[0].keys() == vols[1].keys()
    assert vols[0] == pytest.approx(vols[1], rel=1e-3, abs=0.5)

    res = run("segment", ct, "-m", onnx_path, "-o", tmp_path / "bf16", "--precision", "bf16")
    assert "ONNX models run in fp32 only" in error_line(res)
    assert not (tmp_path / "bf16" / "example_ct_sm_seg.nii.gz").exists()


def test_export_torchscript_by_suffix_and_one_line_errors(tmp_path, tiny_checkpoint) -> None:
    res = run("export", tiny_checkpoint, "-o", tmp_path / "tiny.pt")
    assert res.exit_code == 0, res.output
    assert "(torchscript): unetr_tiny" in res.output and (tmp_path / "tiny.pt").is_file()

    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    assert f"{notes}: not a safetensors file" in error_line(run("export", notes, "-o", tmp_path / "a.onnx"))
    line = error_line(run("export", tiny_checkpoint, "-o", notes / "a.onnx"))
    assert "cannot be created" in line and "notes.txt is a file" in line
    assert "cannot tell the format" in error_line(run("export", tiny_checkpoint, "-o", tmp_path / "a.bin"))
    # a TorchScript archive is never loaded as a segmentation model (it would be unpickled)
    line = error_line(run("segment", notes, "-m", tmp_path / "tiny.pt", "-o", tmp_path / "out"))
    assert "never unpickles" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "tiny.pt"]
