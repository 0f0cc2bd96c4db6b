"""`medvit segment --output-type`: DICOM SEG files through click."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from click.testing import CliRunner

from helpers import dicom_series_with_uids
from medvit.cli.main import main
from medvit.pipelines.segment import Segmenter


@pytest.fixture
def series(shared_data, tmp_path):
    return dicom_series_with_uids(shared_data / "ct_dicom", tmp_path / "ct_series")


@pytest.fixture
def liver_box(monkeypatch) -> None:
    """The model's mask is a liver box on slices 5-9 (the model itself is tested elsewhere)."""

    def predict(self: Segmenter, scan) -> np.ndarray:  # noqa: ANN001
        scan = getattr(scan, "scan", scan)  # a Prepared scan from the batch loop
        mask = np.zeros(scan.shape, np.uint8)
        mask[200:300, 150:250, 5:10] = 1
        return mask

    monkeypatch.setattr(Segmenter, "predict", predict)


def run(*args):
    return CliRunner().invoke(main, ["segment", *map(str, args)], catch_exceptions=False)


def test_both_writes_nifti_and_dicom_seg(series, tiny_checkpoint, tmp_path, liver_box) -> None:
    out = tmp_path / "out"
    res = run(series, "-m", tiny_checkpoint, "-o", out, "--output-type", "both", "-q")
    assert res.exit_code == 0, res.output
    nifti, dcm = out / "ct_series_seg.nii.gz", out / "ct_series_seg.dcm"
    assert f"{series} -> {nifti}, {dcm} (liver " in res.output
    seg = hd.seg.segread(dcm)
    assert seg.NumberOfFrames == 5 and seg.SegmentSequence[0].SegmentLabel == "liver"
    assert sorted(p.name for p in out.iterdir()) == ["ct_series_seg.dcm", "ct_series_seg.nii.gz",
                                                     "ct_series_volumes.json"]

    res = run(series, "-m", tiny_checkpoint, "-o", out, "--output-type", "dicom-seg", "--skip-existing", "-q")
    assert res.exit_code == 0 and "already segmented" in res.output, res.output


def test_dicom_seg_of_a_nifti_file_is_one_error_line(shared_data, tiny_checkpoint, tmp_path, liver_box) -> None:
    ct = shared_data / "ct" / "example_ct_sm.nii.gz"
    res = run(ct, "-m", tiny_checkpoint, "-o", tmp_path, "--output-type", "dicom-seg", "-q")
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        f"Error: {ct}: --output-type dicom-seg needs a DICOM series folder as input (this is a NIfTI file)"
    ]
    assert not list(tmp_path.iterdir())
