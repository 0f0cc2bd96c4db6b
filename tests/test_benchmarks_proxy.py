"""The generalisation benchmark's proxy set: every copy moves its labels with its image.

A tiny synthetic scan whose intensities are a function of its labels is put through
``benchmarks/_proxy.py``; inside each (eroded) label of each copy the image must still
hold that label's value, each copy's voxels must sit where the original's were in world
space, and the scorer must give the same Dice to medvit-style and nnU-Net-style masks.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _proxy  # noqa: E402
from _scoring import score_masks, shifted_summary  # noqa: E402

NAMES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
HU = {0: -1000, 1: 50, 2: 150, 3: 200, 5: 100}  # the image is HU[label]
AFFINE = np.array([[-2.0, 0, 0, 30.0], [0, 2.0, 0, -12.0], [0, 0, 3.0, 7.0], [0, 0, 0, 1]])  # LAS, anisotropic
EXTRA_BELOW = 4  # slices the "full CT" has below the labelled scan


def _labels() -> np.ndarray:
    lab = np.zeros((30, 26, 12), np.uint8)
    lab[3:14, 4:16, 2:12] = 5
    lab[17:27, 5:15, 4:11] = 1
    lab[4:10, 17:24, 0:6] = 2
    lab[18:25, 17:24, 0:7] = 3
    return lab


def _save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    lab = _labels()
    img = np.vectorize(HU.get)(lab).astype(np.int16)
    below = np.full(lab.shape[:2] + (EXTRA_BELOW,), -1000, np.int16)
    below[5:12, 18:23, :] = 150  # the right kidney goes on below the labels
    _save(img, src / "ct.nii.gz")
    _save(lab, src / "seg.nii.gz")
    _save(np.concatenate([below, img], axis=2).astype(np.int32), src / "full.nii.gz")
    out = tmp_path_factory.mktemp("proxy")
    _proxy.build_proxy_set(out, src / "ct.nii.gz", src / "seg.nii.gz", holdout_slices=3,
                           full_ct=src / "full.nii.gz", names=NAMES)
    return out


def _load(proxy: Path, case: str) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray]:
    img = nib.load(proxy / "images" / f"{case}.nii.gz")
    lab = nib.load(proxy / "labels" / f"{case}.nii.gz")
    assert img.shape == lab.shape, case
    np.testing.assert_allclose(img.affine, lab.affine, atol=1e-4, err_msg=case)
    return img, np.asarray(img.dataobj), np.asarray(lab.dataobj)


def _world_to_original(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Original voxel index (nearest) of every voxel centre of a copy's grid."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    return np.rint((world - AFFINE[:3, 3]) @ np.linalg.inv(AFFINE[:3, :3]).T).astype(int)


def test_the_set_lists_every_copy_with_its_files(proxy: Path) -> None:
    manifest = json.loads((proxy / "proxy.json").read_text())
    expected = [c.name for c in _proxy.PROXY_COPIES] + ["heldout_slab", "full_ct"]
    assert list(manifest["cases"]) == expected
    assert sorted(p.name for p in (proxy / "images").iterdir()) == sorted(f"{c}.nii.gz" for c in expected)
    assert manifest["cases"]["full_ct"]["labelled_slices"] == [EXTRA_BELOW, EXTRA_BELOW + 12]
    assert manifest["cases"]["original"]["scored"] == list(NAMES.values())


@pytest.mark.parametrize("case", ["original", "fine_grid", "rotated", "fov_crop", "lps", "heldout_slab"])
def test_labels_stay_on_their_image_values(proxy: Path, case: str) -> None:
    nii, img, lab = _load(proxy, case)
    # Interpolation mixes values within one original voxel of an edge (the copies' axes are
    # parallel to the original's, except the rotated one, which keeps its spacing).
    depth = np.ceil(np.sort(np.linalg.norm(AFFINE[:3, :3], axis=0)) / np.sort(nii.header.get_zooms())).astype(int)
    box = np.ones(tuple(2 * depth + 1), bool)
    for lid, hu in HU.items():
        inner = binary_erosion(lab == lid, structure=box)
        if lid and case != "heldout_slab":
            assert inner.sum() > 20, (case, lid)
        values = img[inner].astype(float)
        if lid == 0 and case == "rotated":  # corners turned in from outside the scan are air
            values[values == _proxy.AIR_HU] = hu
        # Linear interpolation inside a region of one value gives that value back.
        assert np.all(np.abs(values - hu) <= 1.0), (case, lid)


@pytest.mark.parametrize("case", ["original", "fine_grid", "fov_crop", "lps", "heldout_slab"])
def test_each_voxel_keeps_its_world_position(proxy: Path, case: str) -> None:
    nii, _, lab = _load(proxy, case)
    orig = _labels()
    idx = _world_to_original(nii.affine, nii.shape)
    inside = np.all((idx >= 0) & (idx < orig.shape), axis=1)
    assert inside.all(), case  # every copy lies within the original field of view
    agree = np.mean(orig[tuple(idx.T)] == lab.reshape(-1))
    # fine_grid: voxel centres exactly between two original voxels may round either way
    assert agree >= (0.97 if case == "fine_grid" else 1.0), (case, agree)


def test_geometry_of_the_grid_copies(proxy: Path) -> None:
    fine, _, _ = _load(proxy, "fine_grid")
    np.testing.assert_allclose(fine.header.get_zooms(), (0.8, 0.8, 2.0), atol=1e-6)
    assert fine.shape == (75, 65, 18)  # the same 60 x 52 x 36 mm field of view
    lps, img, _ = _load(proxy, "lps")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    rotated, _, rot_lab = _load(proxy, "rotated")
    np.testing.assert_allclose(rotated.affine, AFFINE, atol=1e-4)
    assert (rot_lab != _labels()).mean() > 0.02  # the content moved, the grid did not
    crop, _, _ = _load(proxy, "fov_crop")
    assert crop.shape == (24, 21, 11)
    np.testing.assert_allclose(crop.affine[:3, 3], AFFINE[:3, :3] @ [3, 2, 1] + AFFINE[:3, 3], atol=1e-4)
    b, _, _ = _load(proxy, "scanner_b")
    assert nib.aff2axcodes(b.affine) == ("L", "P", "S")
    np.testing.assert_allclose(b.header.get_zooms(), (1.0, 1.0, 2.0), atol=1e-6)


def test_intensity_copies(proxy: Path) -> None:
    lab = _labels()
    _, contrast, contrast_lab = _load(proxy, "contrast")
    assert np.array_equal(contrast_lab, lab)
    for lid, hu in HU.items():
        expected = hu if lid == 0 else round(1.1 * hu + 40)  # air keeps its value
        assert np.all(contrast[lab == lid] == expected), lid
    _, noisy, noisy_lab = _load(proxy, "noise")
    assert np.array_equal(noisy_lab, lab)
    residual = noisy.astype(float) - np.vectorize(HU.get)(lab)
    assert 22.0 < residual.std() < 28.0 and abs(residual.mean()) < 2.0
    again = _proxy.add_noise(_proxy.sitk.ReadImage(str(proxy / "images" / "original.nii.gz")))
    assert np.array_equal(_proxy.sitk.GetArrayFromImage(again).transpose(2, 1, 0), noisy)  # fixed seed
    _, blurred, blurred_lab = _load(proxy, "blur")
    assert np.array_equal(blurred_lab, lab)
    assert blurred[lab == 0].max() > -900  # air next to organs is brightened by the blur


def test_training_slab_and_full_ct(proxy: Path) -> None:
    slab = json.loads((proxy / "train_slab" / "dataset.json").read_text())
    assert slab["labels"] == {"0": "background", **{str(k): v for k, v in NAMES.items()}}
    train = nib.load(proxy / "train_slab" / slab["training"][0]["label"])
    assert np.array_equal(np.asarray(train.dataobj), _labels()[:, :, 3:])
    np.testing.assert_allclose(train.affine[:3, 3], AFFINE[:3, :3] @ [0, 0, 3] + AFFINE[:3, 3], atol=1e-4)
    _, full, full_lab = _load(proxy, "full_ct")
    assert full.shape[2] == 12 + EXTRA_BELOW and not full_lab[:, :, :EXTRA_BELOW].any()
    assert np.array_equal(full_lab[:, :, EXTRA_BELOW:], _labels())


def _masks_from_labels(proxy: Path, out: Path, lut: dict[int, int], suffix: str) -> None:
    out.mkdir()
    for path in (proxy / "labels").iterdir():
        nii = nib.load(path)
        lab = np.asarray(nii.dataobj)
        mask = np.zeros_like(lab)
        for src, dst in lut.items():
            mask[lab == src] = dst
        nib.save(nib.Nifti1Image(mask, nii.affine), out / path.name.replace(".nii.gz", f"{suffix}.nii.gz"))


def test_scoring_is_the_same_for_either_tool(proxy: Path, tmp_path: Path) -> None:
    # medvit writes the reference ids as <case>_seg.nii.gz; nnU-Net contiguous ids as <case>.nii.gz
    _masks_from_labels(proxy, tmp_path / "medvit", {k: k for k in NAMES}, "_seg")
    _masks_from_labels(proxy, tmp_path / "nnunet", {1: 1, 2: 2, 3: 3, 5: 4}, "")
    medvit = score_masks(proxy, tmp_path / "medvit", NAMES, NAMES)
    nnunet = score_masks(proxy, tmp_path / "nnunet", {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "liver"}, NAMES)
    for case, entry in medvit["cases"].items():
        assert entry["status"] == "ok", case
        assert {n: r["dice"] for n, r in entry["labels"].items()} == {n: 1.0 for n in entry["labels"]}, case
        assert entry["labels"] == nnunet["cases"][case]["labels"], case
    # the held-out slab has no spleen; it is scored all the same (a spleen predicted there would count)
    assert set(medvit["cases"]["heldout_slab"]["labels"]) == {"spleen", "kidney_right", "kidney_left", "liver"}
    outside = medvit["full_ct_outside_slab"]["kidney_right"]
    assert outside["predicted_outside_ml"] == 0.0  # labels only: nothing predicted off the slab
    assert outside["continues_off_slab"] and outside["verdict"].endswith("missed")  # the kidney reaches the slab's edge
    assert not medvit["full_ct_outside_slab"]["spleen"]["continues_off_slab"]
    assert outside["reference_on_slab_ml"] == pytest.approx(6 * 7 * 6 * 12 / 1000, abs=0.05)


def test_scoring_flags_off_grid_missing_and_hallucinated(proxy: Path, tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    _masks_from_labels(proxy, masks, {k: k for k in NAMES}, "_seg")
    (masks / "noise_seg.nii.gz").unlink()
    lab = np.asarray(nib.load(proxy / "labels" / "lps.nii.gz").dataobj)
    _save(lab, masks / "lps_seg.nii.gz")  # an LAS affine on the LPS copy: a mask off its scan's grid
    full = nib.load(proxy / "labels" / "full_ct.nii.gz")
    pred = np.asarray(full.dataobj).copy()
    pred[0:20, 0:25, :EXTRA_BELOW] = 2  # 2000 voxels of "kidney" below the labelled slab: 48 ml
    nib.save(nib.Nifti1Image(pred, full.affine), masks / "full_ct_seg.nii.gz")
    scores = score_masks(proxy, masks, NAMES, NAMES)
    assert scores["cases"]["noise"]["status"] == "missing"
    assert scores["cases"]["lps"]["status"].startswith("off-grid")
    kidney = scores["full_ct_outside_slab"]["kidney_right"]
    assert kidney["predicted_outside_ml"] == pytest.approx(20 * 25 * EXTRA_BELOW * 12 / 1000, abs=0.05)
    assert kidney["reaches_mm_off_slab"] == pytest.approx(EXTRA_BELOW * 3.0)
    shutil.rmtree(masks)


def test_shifted_summary_by_hand() -> None:
    organs = ("spleen", "liver")
    names = [c.name for c in _proxy.PROXY_COPIES]
    # each copy scores spleen 0.5 and liver 0.9, except: the original 1.0 / 1.0 (not a shifted
    # copy), `contrast` 0.1 / 0.9, and `noise` without a liver mask (0)
    cases = {n: {"labels": {"spleen": {"dice": 0.5}, "liver": {"dice": 0.9}}} for n in names}
    cases["original"]["labels"] = {"spleen": {"dice": 1.0}, "liver": {"dice": 1.0}}
    cases["contrast"]["labels"]["spleen"]["dice"] = 0.1
    del cases["noise"]["labels"]["liver"]
    s = shifted_summary({"cases": cases}, organs)
    assert len(s["copies"]) == 8 and "original" not in s["copies"]
    assert s["original"] == 1.0
    assert s["copies"]["contrast"] == pytest.approx(0.5) and s["copies"]["noise"] == pytest.approx(0.25)
    assert s["worst"] == pytest.approx(0.25)
    assert s["mean"] == pytest.approx((6 * 0.7 + 0.5 + 0.25) / 8)
    assert s["per_organ"]["spleen"] == pytest.approx((7 * 0.5 + 0.1) / 8)
    assert s["per_organ"]["liver"] == pytest.approx(7 * 0.9 / 8)
