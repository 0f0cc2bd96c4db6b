"""The whole path on the shared real CT: preprocess, train a few steps, segment, evaluate."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from click.testing import CliRunner

from medvit.cli.main import main

TINY = [
    "--model", "unetr_tiny", "--model-arg", "feature_size=4", "--model-arg", "skip_indices=[0,1,2]",
    "--model-arg", 'encoder_args={"embed_dim": 32, "depth": 3, "num_heads": 2}',
    "--patch-size", "32", "32", "32",
]


def invoke(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def test_real_ct_preprocess_train_segment_evaluate(tmp_path, shared_data) -> None:
    ct = shared_data / "ct"
    ds = {
        "name": "real", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver"},
        "training": [{"image": str(ct / "example_ct_sm.nii.gz"), "label": str(ct / "example_seg.nii.gz")}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    out = invoke("preprocess", tmp_path / "dataset.json", "-o", tmp_path / "pre", "--spacing", "4", "4", "4")
    assert "liver" in out
    invoke("train", tmp_path / "pre", "-o", tmp_path / "run", *TINY, "--max-steps", "2", "--batch-size", "1", "-q")
    ckpt = tmp_path / "run" / "last.safetensors"
    invoke("segment", ct / "example_ct.nii.gz", shared_data / "ct_dicom", "-m", ckpt, "-o", tmp_path / "seg", "-q")

    src = nib.load(ct / "example_ct.nii.gz")
    mask = nib.load(tmp_path / "seg" / "example_ct_seg.nii.gz")
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 3, 5}  # the dataset's own label ids

    series = sitk.ImageSeriesReader()
    series.SetFileNames(series.GetGDCMSeriesFileNames(str(shared_data / "ct_dicom")))
    ref = series.Execute()
    dmask = sitk.ReadImage(str(tmp_path / "seg" / "ct_dicom_seg.nii.gz"))
    assert dmask.GetSize() == ref.GetSize()
    np.testing.assert_allclose(dmask.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(dmask.GetDirection(), ref.GetDirection(), atol=1e-6)

    # the card remembers the preprocessing of the source, not the cache's identity transform
    from medvit.pipelines.checkpoint import read_card

    assert read_card(ckpt).preprocessing["spacing"] == [4.0, 4.0, 4.0]
    sm_mask = tmp_path / "sm"
    invoke("segment", ct / "example_ct_sm.nii.gz", "-m", ckpt, "-o", sm_mask, "-q")
    table = invoke("evaluate", sm_mask / "example_ct_sm_seg.nii.gz", ct / "example_seg.nii.gz",
                   "--labels", "5=liver", "--csv", tmp_path / "eval.csv")
    assert "liver" in table and (tmp_path / "eval.csv").exists()
