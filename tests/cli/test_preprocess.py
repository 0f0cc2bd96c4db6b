"""Tests for `medvit preprocess`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import pytest
from click.testing import CliRunner

from medvit.cli.main import main
from medvit.pipelines.datasets import load_dataset
from medvit.pipelines.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_dataset(
        tmp_path_factory.mktemp("cli") / "ds", 3, seed=2, shape=(48, 40, 20), spacing=(1.5, 1.5, 3.0)
    )


def test_preprocess_command(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "pre"
    result = CliRunner().invoke(
        main,
        ["preprocess", str(dataset.parent), "-o", str(out), "--spacing", "3", "3", "3", "--intensity", "none",
         "--max-cases", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Dataset medvit_phantom (msd, CT): 2 training cases" in text
    assert "median spacing 1.5 x 1.5 x 3 mm, median shape 48 x 40 x 20" in text
    assert "liver" in text and "kidney_left" in text
    assert "Suggested: spacing 1.5 x 1.5 x 3 mm, patch size 48 x 32 x 16" in text
    assert "Used: spacing 3 x 3 x 3 mm, intensity none, patch size 16 x 16 x 16" in text
    assert str(out / "medvit_preprocessed.json") in text

    manifest = json.loads((out / "medvit_preprocessed.json").read_text())
    assert [c["name"] for c in manifest["cases"]] == ["case_000", "case_001"]
    assert manifest["preprocessing"]["spacing"] == [3.0, 3.0, 3.0]
    assert manifest["preprocessing"]["intensity"] == "none"
    img = nib.load(str(out / "imagesTr" / "case_000.nii.gz"))
    assert img.header.get_zooms() == pytest.approx((3.0, 3.0, 3.0))
    assert img.shape == (24, 20, 20)
    # intensity none keeps Hounsfield units
    assert img.get_fdata().min() < -500
    spec = load_dataset(out)
    assert spec.layout == "preprocessed" and spec.remapped
    assert json.loads((out / "fingerprint.json").read_text())["num_cases"] == 2


def test_preprocess_defaults(dataset: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["preprocess", str(dataset), "-o", str(tmp_path / "pre")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "pre" / "medvit_preprocessed.json").read_text())
    assert manifest["preprocessing"]["spacing"] == [1.5, 1.5, 3.0]  # the planned spacing
    assert manifest["preprocessing"]["intensity"] == "ct"  # the CT modality's preset
    assert len(manifest["cases"]) == 3


def _assert_one_line_error(result, needle: str) -> None:  # noqa: ANN001
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert needle in lines[0]
    assert "Traceback" not in result.output


def test_preprocess_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "dataset.json"
    result = CliRunner().invoke(main, ["preprocess", str(missing), "-o", str(tmp_path / "out")])
    _assert_one_line_error(result, str(missing))
    assert not (tmp_path / "out").exists()


def test_preprocess_invalid_json(tmp_path: Path) -> None:
    bad = tmp_path / "dataset.json"
    bad.write_text("{not json")
    result = CliRunner().invoke(main, ["preprocess", str(bad), "-o", str(tmp_path / "out")])
    _assert_one_line_error(result, f"{bad}: invalid JSON")


def test_preprocess_missing_case_file(dataset: Path, tmp_path: Path) -> None:
    data = json.loads(dataset.read_text())
    label = dataset.parent / "labelsTr" / "case_000.nii.gz"
    data["training"] = [{"image": str(tmp_path / "gone.nii.gz"), "label": str(label)}]
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["preprocess", str(tmp_path / "ds"), "-o", str(tmp_path / "out")])
    _assert_one_line_error(result, str(tmp_path / "gone.nii.gz"))


def test_preprocess_bad_options(dataset: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["preprocess", str(dataset), "-o", str(tmp_path / "o"), "--intensity", "hu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    result = runner.invoke(main, ["preprocess", str(dataset), "-o", str(tmp_path / "o"), "--spacing", "0", "1", "1"])
    assert result.exit_code == 1 and "Error: spacing must be three positive numbers" in result.output
    result = runner.invoke(main, ["preprocess", str(dataset)])
    assert result.exit_code == 2 and "-o" in result.output
    assert not (tmp_path / "o" / "medvit_preprocessed.json").exists()
