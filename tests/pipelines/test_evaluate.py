"""Tests for mask evaluation: MONAI Dice/HD95 against numpy/scipy, conventions, pairing, grids, CSV."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion, distance_transform_edt

from medvit.pipelines.errors import MedvitError
from medvit.pipelines.evaluate import (
    CSV_COLUMNS,
    EvalConfig,
    UnmatchedCaseWarning,
    evaluate,
    evaluate_pair,
    pair_cases,
    summarize,
)
from medvit.pipelines.phantom import make_phantom

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHAPE = (40, 32, 16)
SPACING = (0.8, 1.2, 2.5)  # anisotropic on purpose: HD must be in mm, not voxels
# MONAI measures distances in float32; the scipy reference is float64.
HD_TOL_MM = 1e-3
DICE_TOL = 1e-6


def _affine(spacing: tuple[float, float, float] = SPACING, origin: tuple[float, float, float] = (-10.0, 5.0, 20.0)):
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


def _save(path: Path, mask: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), _affine() if affine is None else affine), str(path))
    return path


def _box(offset: tuple[int, int, int] = (0, 0, 0), label: int = 1) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    i, j, k = offset
    mask[10 + i : 30 + i, 8 + j : 24 + j, 4 + k : 12 + k] = label
    return mask


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~binary_erosion(mask)


def _reference_hd(pred: np.ndarray, gt: np.ndarray, spacing, percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance from scipy's EDT on the two surfaces."""
    sp, sg = _surface(pred), _surface(gt)
    to_gt = distance_transform_edt(~sg, sampling=spacing)[sp]
    to_pred = distance_transform_edt(~sp, sampling=spacing)[sg]
    return float(max(np.percentile(to_gt, percentile), np.percentile(to_pred, percentile)))


def _reference_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(pred & gt) / (np.count_nonzero(pred) + np.count_nonzero(gt))


def _by_label(rows: list[dict]) -> dict[int, dict]:
    return {r["label_id"]: r for r in rows}


def test_perfect_prediction_scores_dice_one_and_hd_zero(tmp_path: Path) -> None:
    ph = make_phantom(seed=0, shape=SHAPE)
    gt = _save(tmp_path / "gt" / "case.nii.gz", ph.labels, ph.affine)
    pred = _save(tmp_path / "pred" / "case.nii.gz", ph.labels, ph.affine)
    rows = evaluate_pair(pred, gt, EvalConfig())
    present = sorted(int(v) for v in np.unique(ph.labels) if v > 0)
    assert [r["label_id"] for r in rows] == present and len(present) >= 3
    voxel_ml = abs(np.linalg.det(ph.affine[:3, :3])) / 1000.0
    for r in rows:
        assert r["case"] == "case"
        assert r["label"] == f"label_{r['label_id']}"
        assert r["dice"] == 1.0 and r["hd95_mm"] == 0.0
        expected_ml = np.count_nonzero(ph.labels == r["label_id"]) * voxel_ml
        assert r["pred_ml"] == pytest.approx(expected_ml) and r["gt_ml"] == pytest.approx(expected_ml)


@pytest.mark.parametrize(("axis", "shift"), [(0, 2), (1, 3), (2, 2)])
def test_shifted_box_known_dice_and_hd_in_mm(tmp_path: Path, axis: int, shift: int) -> None:
    offset = [0, 0, 0]
    offset[axis] = shift
    gt_mask, pred_mask = _box(), _box(tuple(offset))
    gt = _save(tmp_path / "gt.nii.gz", gt_mask)
    pred = _save(tmp_path / "pred.nii.gz", pred_mask)
    size = (20, 16, 8)[axis]
    # Two equal boxes overlapping on (size - shift) of their length along the shift.
    expected_dice = (size - shift) / size
    [row] = evaluate_pair(pred, gt, EvalConfig())
    assert row["dice"] == pytest.approx(expected_dice, abs=DICE_TOL)
    # The farthest surface point is the displaced end face: shift voxels of this axis's spacing.
    [row_max] = evaluate_pair(pred, gt, EvalConfig(hd_percentile=100.0))
    assert row_max["hd95_mm"] == pytest.approx(shift * SPACING[axis], abs=HD_TOL_MM)
    assert row["hd95_mm"] == pytest.approx(_reference_hd(pred_mask > 0, gt_mask > 0, SPACING), abs=HD_TOL_MM)
    assert row["gt_ml"] == pytest.approx(20 * 16 * 8 * np.prod(SPACING) / 1000.0)


def test_matches_numpy_dice_and_scipy_hd95_on_irregular_shapes(tmp_path: Path) -> None:
    """Two phantoms with different organ poses on one anisotropic grid: every label checked."""
    spacing = (3.6, 3.75, 7.5)
    gt_ph = make_phantom(seed=0, shape=SHAPE, spacing=spacing)
    pred_ph = make_phantom(seed=1, shape=SHAPE, spacing=spacing)
    gt = _save(tmp_path / "gt.nii.gz", gt_ph.labels, gt_ph.affine)
    pred = _save(tmp_path / "pred.nii.gz", pred_ph.labels, gt_ph.affine)
    rows = _by_label(evaluate_pair(pred, gt, EvalConfig()))
    assert len(rows) >= 3
    checked = 0
    for label_id, row in rows.items():
        p, g = pred_ph.labels == label_id, gt_ph.labels == label_id
        if not p.any() or not g.any():
            continue
        checked += 1
        assert row["dice"] == pytest.approx(_reference_dice(p, g), abs=DICE_TOL)
        assert 0.0 < row["dice"] < 1.0
        assert row["hd95_mm"] == pytest.approx(_reference_hd(p, g, spacing), abs=HD_TOL_MM)
        # Spacing must matter: the same masks measured in voxels give another number.
        assert abs(row["hd95_mm"] - _reference_hd(p, g, (1.0, 1.0, 1.0))) > 0.1
    assert checked >= 3


def test_empty_label_conventions(tmp_path: Path) -> None:
    gt_mask = _box(label=1)
    pred_mask = gt_mask.copy()
    pred_mask[0:4, 0:4, 0:4] = 2  # only in the prediction
    gt_mask[34:38, 26:30, 0:4] = 3  # only in the reference
    gt = _save(tmp_path / "gt.nii.gz", gt_mask)
    pred = _save(tmp_path / "pred.nii.gz", pred_mask)
    labels = {1: "liver", 2: "spleen", 3: "kidney", 9: "absent"}
    rows = _by_label(evaluate_pair(pred, gt, EvalConfig(labels=labels)))
    assert sorted(rows) == [1, 2, 3, 9]
    assert {k: r["label"] for k, r in rows.items()} == labels
    assert rows[1]["dice"] == 1.0 and rows[1]["hd95_mm"] == 0.0
    for only_one in (2, 3):
        assert rows[only_one]["dice"] == 0.0 and math.isinf(rows[only_one]["hd95_mm"])
    assert rows[2]["pred_ml"] > 0 and rows[2]["gt_ml"] == 0
    assert rows[3]["gt_ml"] > 0 and rows[3]["pred_ml"] == 0
    assert rows[9]["dice"] == 1.0 and rows[9]["hd95_mm"] == 0.0 and rows[9]["pred_ml"] == 0.0

    # Without names: each label present in either mask, and only those.
    assert sorted(_by_label(evaluate_pair(pred, gt, EvalConfig()))) == [1, 2, 3]


@pytest.mark.parametrize(
    ("labels", "percentile"), [({0: "background"}, 95.0), ({1: "a"}, 0.0), ({1: "a"}, 101.0), ({}, 95.0)]
)
def test_bad_config_is_a_user_error(tmp_path: Path, labels: dict, percentile: float) -> None:
    gt = _save(tmp_path / "gt.nii.gz", _box())
    with pytest.raises(MedvitError):
        evaluate_pair(gt, gt, EvalConfig(labels=labels, hd_percentile=percentile))


def test_grid_mismatch_names_both_files(tmp_path: Path) -> None:
    gt = _save(tmp_path / "gt.nii.gz", _box())
    other_shape = _save(tmp_path / "small.nii.gz", np.zeros((40, 32, 15), np.uint8))
    with pytest.raises(MedvitError, match=r"small\.nii\.gz.*gt\.nii\.gz.*shape") as info:
        evaluate_pair(other_shape, gt, EvalConfig())
    assert "\n" not in str(info.value)

    moved = _save(tmp_path / "moved.nii.gz", _box(), _affine(origin=(-10.0, 5.5, 20.0)))
    with pytest.raises(MedvitError, match=r"moved\.nii\.gz.*gt\.nii\.gz.*origin") as info:
        evaluate_pair(moved, gt, EvalConfig())
    assert "\n" not in str(info.value)

    respaced = _save(tmp_path / "respaced.nii.gz", _box(), _affine(spacing=(0.8, 1.2, 2.0)))
    with pytest.raises(MedvitError, match=r"spacing"):
        evaluate_pair(respaced, gt, EvalConfig())

    # Rounding far below the tolerance is the same grid.
    nudged = _save(tmp_path / "nudged.nii.gz", _box(), _affine(origin=(-10.0, 5.0 + 1e-4, 20.0)))
    [row] = evaluate_pair(nudged, gt, EvalConfig())
    assert row["dice"] == 1.0


def test_image_instead_of_mask_is_a_user_error(tmp_path: Path) -> None:
    ph = make_phantom(seed=0, shape=SHAPE)
    image = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ph.image, ph.affine), str(image))
    gt = _save(tmp_path / "gt.nii.gz", ph.labels, ph.affine)
    with pytest.raises(MedvitError, match=r"ct\.nii\.gz: not a label mask"):
        evaluate_pair(image, gt, EvalConfig())
    text = tmp_path / "x.nii.gz"
    text.write_text("not an image")
    with pytest.raises(MedvitError, match=r"x\.nii\.gz"):
        evaluate_pair(text, gt, EvalConfig())


def test_folder_pairing_with_seg_names_and_unmatched_warnings(tmp_path: Path) -> None:
    for name in ("case_a", "case_b", "case_c"):
        _save(tmp_path / "gt" / f"{name}.nii.gz", _box())
    _save(tmp_path / "pred" / "case_a_seg.nii.gz", _box())  # what `medvit segment` writes
    _save(tmp_path / "pred" / "case_b.nii.gz", _box((2, 0, 0)))
    _save(tmp_path / "pred" / "extra_seg.nii.gz", _box())

    with pytest.warns(UnmatchedCaseWarning) as record:
        pairs = pair_cases(tmp_path / "pred", tmp_path / "gt")
    assert [(c, p.name, g.name) for c, p, g in pairs] == [
        ("case_a", "case_a_seg.nii.gz", "case_a.nii.gz"),
        ("case_b", "case_b.nii.gz", "case_b.nii.gz"),
    ]
    messages = " ".join(str(w.message) for w in record)
    assert "case_c.nii.gz" in messages and "extra_seg.nii.gz" in messages

    with pytest.warns(UnmatchedCaseWarning):
        rows = evaluate(tmp_path / "pred", tmp_path / "gt", progress=False)
    assert [(r["case"], r["dice"]) for r in rows] == [("case_a", 1.0), ("case_b", pytest.approx(0.9))]


def test_exact_name_wins_over_seg_name(tmp_path: Path) -> None:
    _save(tmp_path / "gt" / "x.nii.gz", _box())
    _save(tmp_path / "pred" / "x.nii.gz", _box())
    _save(tmp_path / "pred" / "x_seg.nii.gz", _box((1, 0, 0)))
    with pytest.warns(UnmatchedCaseWarning, match="x_seg"):
        pairs = pair_cases(tmp_path / "pred", tmp_path / "gt")
    assert [p.name for _, p, _ in pairs] == ["x.nii.gz"]


def test_single_file_against_folder_finds_its_partner(tmp_path: Path) -> None:
    for name in ("a", "b"):
        _save(tmp_path / "gt" / f"{name}.nii.gz", _box())
    pred = _save(tmp_path / "b_seg.nii.gz", _box())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the other references were not asked for: no warning
        pairs = pair_cases(pred, tmp_path / "gt")
    assert [(c, g.name) for c, _, g in pairs] == [("b", "b.nii.gz")]
    # Two files pair whatever their names.
    assert pair_cases(pred, tmp_path / "gt" / "a.nii.gz")[0][0] == "a"


def test_no_matching_names_is_a_user_error(tmp_path: Path) -> None:
    _save(tmp_path / "gt" / "one.nii.gz", _box())
    _save(tmp_path / "pred" / "two.nii.gz", _box())
    with pytest.raises(MedvitError, match=r"no prediction.*two\.nii\.gz.*one\.nii\.gz"):
        evaluate(tmp_path / "pred", tmp_path / "gt", csv_path=tmp_path / "out.csv", progress=False)
    assert not (tmp_path / "out.csv").exists()
    with pytest.raises(MedvitError, match="no such file"):
        pair_cases(tmp_path / "missing", tmp_path / "gt")


def test_two_masks_of_one_case_in_a_folder_is_a_user_error(tmp_path: Path) -> None:
    _save(tmp_path / "gt" / "a.nii.gz", _box())
    _save(tmp_path / "gt" / "a.nii", _box())
    _save(tmp_path / "pred" / "a.nii.gz", _box())
    with pytest.raises(MedvitError, match=r"two masks for case 'a'"):
        pair_cases(tmp_path / "pred", tmp_path / "gt")


def test_csv_has_case_rows_then_label_means(tmp_path: Path) -> None:
    for name, offset in (("a", (0, 0, 0)), ("b", (0, 0, 2))):
        gt_mask = _box()
        gt_mask[0:3, 0:3, 0:3] = 2
        pred_mask = _box(offset)
        _save(tmp_path / "gt" / f"{name}.nii.gz", gt_mask)
        _save(tmp_path / "pred" / f"{name}_seg.nii.gz", pred_mask)
    out = tmp_path / "reports" / "eval.csv"
    rows = evaluate(tmp_path / "pred", tmp_path / "gt", EvalConfig(labels={1: "box", 2: "corner"}), out, False)
    assert len(rows) == 4

    with open(out, newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        table = list(reader)
    assert [(r["case"], r["label"]) for r in table] == [
        ("a", "box"), ("a", "corner"), ("b", "box"), ("b", "corner"), ("mean", "box"), ("mean", "corner"),
    ]  # fmt: skip
    mean_box = table[4]
    assert float(mean_box["dice"]) == pytest.approx((1.0 + 0.75) / 2)
    case_hds = [float(table[0]["hd95_mm"]), float(table[2]["hd95_mm"])]
    assert float(mean_box["hd95_mm"]) == pytest.approx(np.mean(case_hds))
    assert float(table[2]["hd95_mm"]) > 0
    # The missed corner: Dice 0, HD95 inf in each case and in the mean.
    assert table[1]["dice"] == "0.0" and table[1]["hd95_mm"] == "inf" and table[5]["hd95_mm"] == "inf"
    assert float(table[5]["gt_ml"]) == pytest.approx(27 * np.prod(SPACING) / 1000.0)
    assert [p.name for p in out.parent.iterdir()] == ["eval.csv"]  # no temporary left behind

    means = summarize(rows)
    assert [(m["label_id"], m["n"]) for m in means] == [(1, 2), (2, 2)]


def test_csv_path_that_is_a_folder_is_a_user_error(tmp_path: Path) -> None:
    gt = _save(tmp_path / "gt.nii.gz", _box())
    with pytest.raises(MedvitError, match="folder"):
        evaluate(gt, gt, csv_path=tmp_path, progress=False)


def test_real_segmentation_against_itself() -> None:
    seg = SHARED_DATA / "ct" / "example_seg.nii.gz"
    if not seg.exists():
        pytest.skip(f"shared real scans not found at {SHARED_DATA} (a clone outside the workplace)")
    rows = evaluate(seg, seg, progress=False)
    present = {int(v) for v in np.unique(np.asarray(nib.load(str(seg)).dataobj)) if v > 0}
    assert {r["label_id"] for r in rows} == present and len(present) > 30
    assert all(r["dice"] == 1.0 and r["hd95_mm"] == 0.0 for r in rows)
    liver = _by_label(rows)[5]
    assert liver["gt_ml"] == pytest.approx(np.count_nonzero(np.asarray(nib.load(str(seg)).dataobj) == 5) * 27 / 1000)
