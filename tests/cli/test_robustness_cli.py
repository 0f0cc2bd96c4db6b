"""`medvit evaluate SCAN LABELS --perturb ... -m CKPT`: robustness curves on the shared real CT."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from medvit.cli.main import main
from medvit.pipelines.robustness_plot import PANEL_W

# The tiny checkpoint's labels, and their ids in the TotalSegmentator map of example_seg.
MODEL_TO_REFERENCE = {1: ("liver", 5), 2: ("spleen", 1), 3: ("kidney_right", 2), 4: ("kidney_left", 3)}


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def real_ct(shared_data: Path) -> tuple[Path, Path, Path]:
    ct = shared_data / "ct"
    return ct / "example_ct_sm.nii.gz", ct / "example_seg.nii.gz", ct / "labels_total.json"


def test_robustness_on_the_real_ct_writes_csv_png_and_table(real_ct, tiny_checkpoint, tmp_path) -> None:
    scan, labels, names = real_ct
    out = tmp_path / "curves"
    result = _invoke("evaluate", scan, labels, "-m", tiny_checkpoint, "--perturb", "noise", "--perturb", "resolution",
                     "--levels", "0,2", "--labels", names, "-o", out, "--device", "cpu", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(out / "robustness.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    per_case = [r for r in table if r["case"] == "example_ct_sm"]
    means = [r for r in table if r["case"] == "mean"]
    assert len(per_case) == len(means) == 2 * 2 * 4 and len(table) == 32
    assert [(r["perturbation"], r["level"], r["parameter"], r["value"]) for r in per_case[::4]] == [
        ("noise", "0", "sigma_hu", "0.0"), ("noise", "2", "sigma_hu", "20.0"),
        ("resolution", "0", "factor", "1.0"), ("resolution", "2", "factor", "3.0"),
    ]  # fmt: skip
    # labels matched by name: the model's ids and names, the reference's voxels of the same organ
    seg = np.asarray(nib.load(str(labels)).dataobj)
    voxel_ml = 27.0 / 1000.0
    for row in per_case:
        name, ref_id = MODEL_TO_REFERENCE[int(row["label_id"])]
        assert row["label"] == name
        assert float(row["gt_ml"]) == pytest.approx((seg == ref_id).sum() * voxel_ml, rel=1e-6)
        assert 0.0 <= float(row["dice"]) <= 1.0
    # level 0 is one prediction, shared by both perturbations
    level0 = [(r["label"], r["dice"], r["pred_ml"]) for r in per_case if r["level"] == "0"]
    assert level0[:4] == level0[4:]

    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["perturbation", "level", "setting", "liver", "spleen", "kidney_right", "kidney_left"]
    assert [line.split()[:3] for line in lines[1:5]] == [
        ["noise", "0", "sigma_hu=0"], ["noise", "2", "sigma_hu=20"],
        ["resolution", "0", "factor=1"], ["resolution", "2", "factor=3"],
    ]  # fmt: skip
    liver_noise2 = next(
        r for r in means if r["perturbation"] == "noise" and r["level"] == "2" and r["label"] == "liver"
    )
    assert lines[2].split()[3] == f"{float(liver_noise2['dice']):.4f}"
    assert "CSV written to" in lines[-1] and "robustness.png" in lines[-1]
    image = Image.open(out / "robustness.png")
    assert image.format == "PNG" and image.size[0] == 2 * PANEL_W
    assert not list(out.glob(".tmp-*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (("--perturb", "noise"), "--perturb needs --model"),
        (("-m", "x.safetensors"), "--model: only with --perturb"),
        (("--perturb", "noise", "-m", "x.safetensors", "--csv", "a.csv"), "give -o OUTDIR, not --csv"),
        (("--perturb", "noise", "-m", "x.safetensors", "--levels", "0,7"), "'7' is not a level from 0 to 5"),
        (("--perturb", "noise", "-m", "x.safetensors", "--levels", "1", "--max-level", "2"), "not both"),
        (("--perturb", "sharpen"), "'sharpen' is not one of"),
    ],
)
def test_perturb_option_mistakes_are_usage_errors(tmp_path, args, message) -> None:
    result = _invoke("evaluate", tmp_path, tmp_path, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
