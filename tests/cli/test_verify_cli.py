"""`medvit preprocess --verify` and `medvit train` refuse a bad dataset, listing every problem."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from medvit.cli.main import main
from medvit.pipelines.phantom import write_phantom_dataset


@pytest.fixture()
def bad_dataset(tmp_path) -> tuple[Path, list[Path]]:
    """A phantom dataset with three broken cases (and one warning)."""
    js = write_phantom_dataset(tmp_path / "ds", 4, seed=4, shape=(24, 20, 12), spacing=(3.0, 3.0, 6.0))
    root = js.parent
    lab0 = root / "labelsTr" / "case_000.nii.gz"
    img = nib.load(str(lab0))
    values = np.asarray(img.dataobj).copy()
    values[0, 0, 0] = 12
    nib.save(nib.Nifti1Image(values, img.affine), str(lab0))
    img1 = root / "imagesTr" / "case_001.nii.gz"
    img1.write_bytes(img1.read_bytes()[:200])
    lab2 = root / "labelsTr" / "case_002.nii.gz"
    lab2.unlink()
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(root / "labelsTr" / "case_003.nii.gz"))
    return js, [lab0, img1, lab2]


def check_refusal(output: str, bad: list[Path], summary: str) -> None:
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert len(errors) == 1 and errors[0] == lines[-1], output
    assert summary in errors[0]
    for path in bad:  # one line each, starting with the file
        assert sum(ln.startswith(f"{path}: ") for ln in lines) == 1, (path, output)
    assert sum(ln.startswith("warning: ") and "case_003" in ln and "empty" in ln for ln in lines) == 1, output


def test_preprocess_verify_refuses_listing_every_problem(bad_dataset, tmp_path) -> None:
    js, bad = bad_dataset
    out = tmp_path / "pre"
    result = CliRunner().invoke(main, ["preprocess", str(js), "-o", str(out), "--verify"])
    assert result.exit_code == 1, result.output
    check_refusal(result.output, bad, "3 problems in 3 files (listed above); nothing was preprocessed")
    assert not out.exists()


def test_preprocess_verify_then_preprocesses_a_clean_dataset(tmp_path) -> None:
    js = write_phantom_dataset(tmp_path / "ds", 2, seed=4, shape=(24, 20, 12), spacing=(3.0, 3.0, 6.0))
    out = tmp_path / "pre"
    result = CliRunner().invoke(main, ["preprocess", str(js), "-o", str(out), "--verify"])
    assert result.exit_code == 0, result.output
    assert "Verified 2 training case(s) of medvit_phantom: no problems" in result.output
    assert len(json.loads((out / "medvit_preprocessed.json").read_text())["cases"]) == 2


def test_train_refuses_a_bad_dataset_before_training(bad_dataset, tmp_path) -> None:
    js, bad = bad_dataset
    run = tmp_path / "run"
    result = CliRunner().invoke(
        main, ["train", str(js), "-o", str(run), "--model", "unetr_tiny", "--max-steps", "1", "-q"]
    )
    assert result.exit_code == 1, result.output
    check_refusal(result.output, bad, "3 problems in 3 files (listed above); nothing was trained")
    assert not run.exists()
