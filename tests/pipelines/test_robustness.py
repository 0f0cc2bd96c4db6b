"""Robustness curves on the phantom, with the network replaced by an intensity threshold."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_tiny_checkpoint
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.io import read_scan
from medvit.pipelines.palette import label_colour
from medvit.pipelines.robustness import (
    CURVE_COLUMNS,
    RobustnessConfig,
    match_labels,
    robustness_curve,
    summarize_curve,
    write_curve_csv,
)
from medvit.pipelines.robustness_plot import PANEL_W, plot_curves
from medvit.pipelines.segment import SegmentConfig, Segmenter

THRESHOLD_HU = 90.0  # kidneys, aorta and bone of the phantom
REFERENCE_ID = 7  # the reference map's own id for what the model calls "liver" (its id 1)


@pytest.fixture(scope="module")
def threshold_case(tmp_path_factory, phantom_scan) -> tuple[Segmenter, Path, Path, list[int]]:
    """A segmenter whose 'network' labels HU > THRESHOLD_HU as class 1, counting its predictions,
    and a reference map that is exactly that threshold of the phantom (under id REFERENCE_ID)."""
    img, _ = phantom_scan
    folder = tmp_path_factory.mktemp("threshold")
    # the model grid is the phantom's own: resampling to it and back is exact
    seg = Segmenter(make_tiny_checkpoint(folder / "c.safetensors", spacing=(3.0, 3.0, 6.0)),
                    SegmentConfig(progress=False))  # fmt: skip
    lo, hi = seg.prep.ct_window
    level = (THRESHOLD_HU - lo) / (hi - lo)
    calls: list[int] = []

    def fake(images: list[torch.Tensor], box=None, body=None) -> torch.Tensor:  # noqa: ANN001 - the whole grid, box or not
        calls.append(1)
        x = torch.as_tensor(images[0])[0]
        out = torch.zeros(seg.card.num_classes, *x.shape)
        out[1] = (x > level).float()
        out[0] = 1.0 - out[1]
        return out

    seg._probabilities = fake
    scan = read_scan(img)
    reference = folder / "reference.nii.gz"
    nib.save(nib.Nifti1Image((scan.array > THRESHOLD_HU).astype(np.uint8) * REFERENCE_ID, scan.affine), reference)
    return seg, img, reference, calls


def test_curve_is_perfect_at_level_zero_and_falls_with_noise(threshold_case) -> None:
    seg, img, reference, calls = threshold_case
    calls.clear()
    config = RobustnessConfig(reference_labels={REFERENCE_ID: "liver", 9: "pancreas"}, progress=False)
    rows = robustness_curve(seg, [(img, reference)], ["noise", "rotation"], [0, 1, 3, 5], config)
    # the unperturbed scan is segmented once for both perturbations
    assert len(calls) == 1 + 2 * 3
    # only the label both name is scored, under the model's id and name
    assert {(r["label_id"], r["label"]) for r in rows} == {(1, "liver")}
    assert [(r["perturbation"], r["level"], r["parameter"], r["value"]) for r in rows] == [
        ("noise", 0, "sigma_hu", 0.0), ("noise", 1, "sigma_hu", 10.0), ("noise", 3, "sigma_hu", 40.0),
        ("noise", 5, "sigma_hu", 80.0), ("rotation", 0, "degrees", 0.0), ("rotation", 1, "degrees", 5.0),
        ("rotation", 3, "degrees", 15.0), ("rotation", 5, "degrees", 30.0),
    ]  # fmt: skip
    dice = {(r["perturbation"], r["level"]): r["dice"] for r in rows}
    assert dice["noise", 0] == 1.0 and dice["rotation", 0] == 1.0
    assert rows[0]["hd95_mm"] == 0.0 and rows[0]["case"] == "phantom"
    noise = [dice["noise", lv] for lv in (0, 1, 3, 5)]
    assert all(b < a for a, b in zip(noise, noise[1:])), noise
    assert noise[-1] < 0.9
    # the labels turn with the image: a thresholding model stays close to them
    assert all(dice["rotation", lv] > 0.85 for lv in (1, 3, 5)), dice
    assert rows[-1]["gt_ml"] == pytest.approx(rows[0]["gt_ml"], rel=0.05)


def test_means_csv_and_plot(threshold_case, tmp_path) -> None:
    seg, img, reference, _ = threshold_case
    config = RobustnessConfig(reference_labels={REFERENCE_ID: "liver"}, progress=False, seed=1)
    pairs = [(img, reference), (img, reference)]
    rows = robustness_curve(seg, pairs, ["noise"], [0, 2], config)
    means = summarize_curve(rows)
    assert [(m["case"], m["perturbation"], m["level"], m["n"]) for m in means] == [
        ("mean", "noise", 0, 2), ("mean", "noise", 2, 2)
    ]  # fmt: skip
    assert means[1]["dice"] == pytest.approx((rows[1]["dice"] + rows[3]["dice"]) / 2)
    # two scans draw different noise (the seed is combined with the scan's index)
    assert rows[1]["dice"] != rows[3]["dice"]
    path = write_curve_csv(rows, tmp_path / "out" / "robustness.csv")
    with open(path, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == list(CURVE_COLUMNS) and len(table) == 4 + 2
    assert [r["case"] for r in table] == ["phantom"] * 4 + ["mean"] * 2
    png = plot_curves(means, tmp_path / "out" / "robustness.png")
    pixels = np.asarray(Image.open(png).convert("RGB"))
    assert pixels.shape[1] == PANEL_W
    # the liver's line is drawn in its label colour
    assert (np.abs(pixels.astype(int) - label_colour(1)).sum(-1) == 0).sum() > 50
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_match_labels_by_name_or_by_id() -> None:
    model = {1: "liver", 2: "spleen"}
    assert match_labels(model, None) == {1: 1, 2: 2}
    assert match_labels(model, {5: "liver", 1: "spleen", 3: "kidney_left"}) == {1: 5, 2: 1}
    with pytest.raises(MedvitError, match="none of the checkpoint's labels"):
        match_labels(model, {3: "kidney_left"})


def test_scan_and_labels_on_different_grids_is_one_line(threshold_case, tmp_path) -> None:
    seg, img, reference, _ = threshold_case
    ref = read_scan(reference)
    shifted = tmp_path / "shifted.nii.gz"
    affine = ref.affine.copy()
    affine[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(ref.array), affine), shifted)
    with pytest.raises(
        MedvitError, match=r"^scan .*phantom.nii.gz and labels .*shifted.nii.gz are not on the same grid"
    ):
        robustness_curve(seg, [(img, shifted)], ["blur"], [0, 1], RobustnessConfig(progress=False))
    with pytest.raises(MedvitError, match="unknown perturbation"):
        robustness_curve(seg, [(img, reference)], ["sharpen"], [0], RobustnessConfig(progress=False))
