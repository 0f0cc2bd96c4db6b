"""Tests for `medvit models`, `medvit info` and `medvit evaluate`."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

import medvit
from medvit.cli.main import main
from medvit.pipelines.phantom import make_phantom, save_phantom

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHAPE = (40, 32, 16)


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_user_error(result: Result, *names: str) -> None:
    """Exit code 1, no traceback, and exactly one line: `Error: ...` naming each of `names`."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for name in names:
        assert name in lines[0]


def _real(name: str) -> Path:
    path = SHARED_DATA / "ct" / name
    if not path.exists():
        pytest.skip(f"shared real scans not found at {SHARED_DATA} (a clone outside the workplace)")
    return path


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    folder = tmp_path_factory.mktemp("phantom")
    ph = make_phantom(seed=0, shape=SHAPE)
    save_phantom(ph, folder / "case.nii.gz", folder / "case_labels.nii.gz")
    return folder / "case.nii.gz", folder / "case_labels.nii.gz", ph


# ---------------------------------------------------------------- models


def _listing(output: str, columns: int = 2) -> dict[str, list[str]]:
    rows = [line.split() for line in output.strip().splitlines()[:-1]]
    assert all(len(r) == columns for r in rows), output
    return {r[0]: r[1:] for r in rows}


def test_models_pattern_lists_matches_with_kind_and_parameter_counts() -> None:
    result = _invoke("models", "unetr*", "--params")
    assert result.exit_code == 0, result.output
    listing = _listing(result.output, columns=3)
    assert list(listing) == medvit.list_models("unetr*")
    # 92,784,046 parameters, counted independently below.
    assert listing["unetr_base"] == ["volume", "92.8M"]
    with torch.device("meta"):
        n = sum(p.numel() for p in medvit.create_model("unetr_base").parameters())
    assert round(n / 1e6, 1) == 92.8
    total = len(medvit.list_models())
    assert result.output.strip().splitlines()[-1] == f"{len(listing)} of {total} models match 'unetr*'"


def test_models_without_pattern_lists_everything_with_kinds() -> None:
    result = _invoke("models")
    assert result.exit_code == 0, result.output
    listing = _listing(result.output)
    assert list(listing) == medvit.list_models()
    assert listing["vit_base_patch16_224"] == ["image"]
    assert listing["timesformer_base"] == ["video"] and listing["unetr_base"] == ["volume"]
    assert result.output.strip().splitlines()[-1] == f"{len(listing)} models"


def test_models_params_counts_every_match() -> None:
    result = _invoke("models", "vit_*_patch16_224", "--params")
    assert result.exit_code == 0, result.output
    listing = _listing(result.output, columns=3)
    assert listing["vit_base_patch16_224"] == ["image", "86.6M"]
    assert all(re.fullmatch(r"\d+\.\dM|\d+\.\dB|\d+\.\dK", c) for _, c in listing.values()), listing


def test_models_plain_word_matches_substring() -> None:
    result = _invoke("models", "patch16_224")
    assert result.exit_code == 0, result.output
    listing = _listing(result.output)
    assert "vit_base_patch16_224" in listing and all("patch16_224" in n for n in listing)
    assert "vit_base_patch32_224" not in listing


def test_models_no_match_is_an_error() -> None:
    result = _invoke("models", "no_such_model*")
    _assert_user_error(result, "no_such_model*")


# ---------------------------------------------------------------- info


def _fields(output: str) -> dict[str, str]:
    fields = {}
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        if value.strip() and not line.startswith(" "):
            fields[key] = value.strip()
    return fields


def test_info_on_a_phantom(phantom_files) -> None:
    image, _, ph = phantom_files
    result = _invoke("info", image)
    assert result.exit_code == 0, result.output
    fields = _fields(result.output)
    assert fields["path"] == str(image)
    assert fields["format"] == "NIfTI"
    assert fields["shape"] == "40 x 32 x 16"
    assert fields["spacing"] == "1.5 x 1.5 x 3.0 mm"
    assert fields["orientation"] == "LPS"
    assert fields["dtype"] == "int16"
    low, high = int(ph.image.min()), int(ph.image.max())
    assert fields["intensity"].startswith(f"min {low}  max {high}  mean ")
    assert float(fields["intensity"].split()[-1]) == pytest.approx(ph.image.mean(), rel=1e-3)
    affine_rows = [line.split() for line in result.output.splitlines()[-4:]]
    np.testing.assert_allclose(np.array(affine_rows, dtype=float), ph.affine, atol=1e-4)


def test_info_on_the_real_ct() -> None:
    ct = _real("example_ct.nii.gz")
    result = _invoke("info", ct)
    assert result.exit_code == 0, result.output
    fields = _fields(result.output)
    assert fields["shape"] == "122 x 101 x 112"
    assert fields["spacing"] == "3.0 x 3.0 x 3.0 mm"
    assert fields["orientation"] == "RAS"
    assert fields["dtype"] == "int32"


def test_info_on_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nii.gz"
    _assert_user_error(_invoke("info", missing), str(missing), "no such file")


def test_info_on_a_text_file_named_nifti(tmp_path: Path) -> None:
    fake = tmp_path / "x.nii.gz"
    fake.write_text("this is not an image\n")
    _assert_user_error(_invoke("info", fake), str(fake))


# ---------------------------------------------------------------- evaluate


def _save_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(path))
    return path


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_perfect_prediction_writes_default_csv_in_cwd(
    phantom_files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, labels, _ = phantom_files
    monkeypatch.chdir(tmp_path)
    result = _invoke("evaluate", labels, labels, "--labels", "1=liver,2=spleen")
    assert result.exit_code == 0, result.output
    table = _read_csv(tmp_path / "evaluation.csv")
    assert "CSV written to evaluation.csv" in result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["label", "id", "n", "mean", "Dice", "mean", "HD95", "mm", "one", "empty"]
    assert lines[1].split() == ["liver", "1", "1", "1.0000", "0.00", "0"]
    assert lines[2].split() == ["spleen", "2", "1", "1.0000", "0.00", "0"]
    assert [(r["case"], r["label"], r["dice"], r["hd95_mm"]) for r in table] == [
        ("case_labels", "liver", "1.0", "0.0"),
        ("case_labels", "spleen", "1.0", "0.0"),
        ("mean", "liver", "1.0", "0.0"),
        ("mean", "spleen", "1.0", "0.0"),
    ]


def test_evaluate_folders_with_seg_names(tmp_path: Path) -> None:
    affine = np.diag([0.8, 1.2, 2.5, 1.0])
    gt = np.zeros(SHAPE, np.uint8)
    gt[10:30, 8:24, 4:12] = 1
    shifted = np.roll(gt, 2, axis=2)  # 6 of 8 slices overlap: Dice 0.75
    for name in ("a", "b", "lonely"):
        _save_mask(tmp_path / "gt" / f"{name}.nii.gz", gt, affine)
    _save_mask(tmp_path / "pred" / "a_seg.nii.gz", gt, affine)
    _save_mask(tmp_path / "pred" / "b_seg.nii.gz", shifted, affine)
    out = tmp_path / "out" / "scores.csv"
    result = _invoke("evaluate", tmp_path / "pred", tmp_path / "gt", "--labels", "1=box", "--csv", out)
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr and "lonely.nii.gz" in result.stderr
    assert re.search(r"^box\s+1\s+2\s+0\.8750\s+", result.stdout, re.M), result.stdout
    # Few cases: the per-case rows are shown too.
    assert re.search(r"^b\s+box\s+0\.7500\s+", result.stdout, re.M), result.stdout
    assert f"2 case(s), 1 label(s); CSV written to {out}" in result.stdout
    table = _read_csv(out)
    assert [(r["case"], float(r["dice"])) for r in table] == [("a", 1.0), ("b", 0.75), ("mean", 0.875)]
    assert float(table[1]["hd95_mm"]) > 0 and float(table[1]["gt_ml"]) == pytest.approx(20 * 16 * 8 * 2.4 / 1000)


def test_evaluate_grid_mismatch_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:10, 5:10, 5:10] = 1
    pred = _save_mask(tmp_path / "pred.nii.gz", mask, np.diag([1.0, 1.0, 2.0, 1.0]))
    gt = _save_mask(tmp_path / "gt.nii.gz", mask, np.diag([1.0, 1.0, 2.5, 1.0]))
    out = tmp_path / "e.csv"
    _assert_user_error(_invoke("evaluate", pred, gt, "--csv", out), str(pred), str(gt))
    assert not out.exists()


def test_evaluate_bad_labels_option_is_a_usage_error(tmp_path: Path) -> None:
    result = _invoke("evaluate", tmp_path, tmp_path, "--labels", "liver")
    assert result.exit_code == 2
    assert "ID=NAME" in result.output and "Traceback" not in result.output


def test_evaluate_real_segmentation_against_itself(tmp_path: Path) -> None:
    seg = _real("example_seg.nii.gz")
    names = _real("labels_total.json")
    out = tmp_path / "real.csv"
    result = _invoke("evaluate", seg, seg, "--labels", names, "--csv", out)
    assert result.exit_code == 0, result.output
    present = {int(v) for v in np.unique(np.asarray(nib.load(str(seg)).dataobj)) if v > 0}
    assert len(present) >= 2, present
    rows = [r for r in _read_csv(out) if r["case"] != "mean"]
    assert {int(r["label_id"]) for r in rows} >= present
    assert all(float(r["dice"]) == 1.0 and float(r["hd95_mm"]) == 0.0 for r in rows)
    liver = next(r for r in rows if r["label_id"] == "5")
    assert liver["label"] == "liver" and float(liver["gt_ml"]) > 0


def test_models_video_kind_lists_video_backbones() -> None:
    from click.testing import CliRunner

    from medvit.cli.main import main

    res = CliRunner().invoke(main, ["models", "video*"])
    assert res.exit_code == 0, res.output
    assert "timesformer_base" in res.output and "vivit_b_16x2_st" in res.output
    assert "vit_base_patch16_224 " not in res.output and "unetr_base" not in res.output
