"""Tests for the synthetic CT phantom generator."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from nibabel.orientations import aff2axcodes
from scipy.ndimage import binary_erosion

from medvit.pipelines import phantom as phantom_module
from medvit.pipelines.phantom import HU, LABELS, Phantom, make_phantom, save_phantom, write_phantom_dataset

SMALL = {"shape": (48, 40, 20), "spacing": (3.0, 3.0, 6.0)}


@pytest.fixture(scope="module")
def default() -> Phantom:
    return make_phantom()


def _voxel_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def _world_centroid(p: Phantom, label: int) -> np.ndarray:
    ijk = np.argwhere(p.labels == label).mean(axis=0)
    return p.affine[:3, :3] @ ijk + p.affine[:3, 3]


def test_labels_dict() -> None:
    assert LABELS == {0: "background", 1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}


def test_default_geometry(default: Phantom) -> None:
    assert default.image.shape == default.labels.shape == (96, 80, 40)
    assert default.image.dtype == np.int16 and default.labels.dtype == np.uint8
    assert aff2axcodes(default.affine) == ("L", "P", "S")
    np.testing.assert_allclose(np.abs(np.diag(default.affine)[:3]), (1.5, 1.5, 3.0))
    # The volume is centred on the world origin, where the anatomy is centred.
    centre = default.affine @ np.array([47.5, 39.5, 19.5, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_deterministic_per_seed(default: Phantom) -> None:
    again = make_phantom(seed=0)
    np.testing.assert_array_equal(again.image, default.image)
    np.testing.assert_array_equal(again.labels, default.labels)
    np.testing.assert_array_equal(again.affine, default.affine)
    other = make_phantom(seed=1)
    assert not np.array_equal(other.labels, default.labels)
    assert not np.array_equal(other.image, default.image)


def test_organ_volumes_plausible(default: Phantom) -> None:
    ml = _voxel_ml(default.affine)
    volumes = {LABELS[k]: float((default.labels == k).sum()) * ml for k in range(1, 5)}
    assert set(np.unique(default.labels)) == {0, 1, 2, 3, 4}
    assert 60 < volumes["liver"] < 250, volumes
    assert 8 < volumes["spleen"] < 50, volumes
    assert 5 < volumes["kidney_right"] < 30 and 5 < volumes["kidney_left"] < 30, volumes
    assert volumes["liver"] == max(volumes.values())
    assert 0.6 < volumes["kidney_right"] / volumes["kidney_left"] < 1.6


def test_intensities(default: Phantom) -> None:
    nominal = {1: HU["liver"], 2: HU["spleen"], 3: HU["kidney_cortex"], 4: HU["kidney_cortex"]}
    for label, hu in nominal.items():
        # Erode so the blurred boundary does not count; the interior must be the organ's HU.
        interior = binary_erosion(default.labels == label)
        values = default.image[interior].astype(float)
        tolerance = 8.0 if label <= 2 else 20.0  # kidneys mix cortex with darker medulla
        assert abs(values.mean() - hu) < tolerance, (LABELS[label], values.mean())
        assert values.min() > -200, "gas or fat painted inside a labelled organ"
    corners = default.image[:6, :6].astype(float)
    assert abs(corners.mean() - HU["air"]) < 5
    assert 8 < corners.std() < 25
    assert default.image.max() > 350, "no bone"


def test_laterality_in_ras_world(default: Phantom) -> None:
    # nibabel RAS+: +x points to the patient's right, +y anterior.
    liver, spleen = _world_centroid(default, 1), _world_centroid(default, 2)
    kidney_r, kidney_l = _world_centroid(default, 3), _world_centroid(default, 4)
    assert liver[0] > 10 and kidney_r[0] > 10
    assert spleen[0] < -10 and kidney_l[0] < -10
    assert liver[1] > kidney_r[1] and liver[1] > spleen[1]


def test_laterality_read_by_itk(default: Phantom, tmp_path: Path) -> None:
    # An independent reader in the other convention: in ITK's LPS the patient's right is -x.
    save_phantom(default, tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz")
    seg = sitk.ReadImage(str(tmp_path / "seg.nii.gz"))
    labels = sitk.GetArrayFromImage(seg)  # (k, j, i)
    for label, sign in ((1, -1), (3, -1), (2, 1), (4, 1)):
        kji = np.argwhere(labels == label).mean(axis=0)
        point = seg.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in kji[::-1]))
        assert np.sign(point[0]) == sign, (LABELS[label], point)


@pytest.mark.parametrize(
    ("orientation", "shape", "spacing"),
    [("RAS", (96, 80, 40), (1.5, 1.5, 3.0)), ("SAL", (40, 80, 96), (3.0, 1.5, 1.5))],
)
def test_orientation_independence(
    default: Phantom, orientation: str, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> None:
    other = make_phantom(seed=0, shape=shape, spacing=spacing, orientation=orientation)
    assert aff2axcodes(other.affine) == tuple(orientation)
    # Reoriented to RAS, both must be the same grid holding the same voxels.
    for field in ("labels", "image"):
        ours = nib.as_closest_canonical(nib.Nifti1Image(getattr(other, field), other.affine))
        ref = nib.as_closest_canonical(nib.Nifti1Image(getattr(default, field), default.affine))
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-9)
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj))


def test_anatomy_size_is_physical(default: Phantom) -> None:
    fine = make_phantom(seed=0, shape=(144, 120, 60), spacing=(1.0, 1.0, 2.0))
    for label in range(1, 5):
        v_default = (default.labels == label).sum() * _voxel_ml(default.affine)
        v_fine = (fine.labels == label).sum() * _voxel_ml(fine.affine)
        assert abs(v_fine / v_default - 1) < 0.06, (LABELS[label], v_default, v_fine)
        np.testing.assert_allclose(_world_centroid(fine, label), _world_centroid(default, label), atol=1.5)


def test_save_round_trip(default: Phantom, tmp_path: Path) -> None:
    image_path, label_path = tmp_path / "sub" / "ct.nii.gz", tmp_path / "sub" / "seg.nii.gz"
    save_phantom(default, image_path, label_path)
    assert sorted(p.name for p in image_path.parent.iterdir()) == ["ct.nii.gz", "seg.nii.gz"]
    for path, array, dtype in ((image_path, default.image, np.int16), (label_path, default.labels, np.uint8)):
        img = nib.load(path)
        assert img.get_data_dtype() == dtype
        data = np.asanyarray(img.dataobj)
        assert data.dtype == dtype
        np.testing.assert_array_equal(data, array)
        np.testing.assert_allclose(img.affine, default.affine, atol=1e-5)
        assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_write_dataset(tmp_path: Path) -> None:
    json_path = write_phantom_dataset(tmp_path / "ds", num_cases=2, seed=3, **SMALL)
    assert json_path == tmp_path / "ds" / "dataset.json"
    meta = json.loads(json_path.read_text())
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left"}
    assert meta["numTraining"] == 2 and isinstance(meta["name"], str)
    assert meta["training"] == [
        {"image": "./imagesTr/case_000.nii.gz", "label": "./labelsTr/case_000.nii.gz"},
        {"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"},
    ]
    loaded = []
    for case in meta["training"]:
        image = nib.load(json_path.parent / case["image"])
        label = nib.load(json_path.parent / case["label"])
        assert image.shape == label.shape == SMALL["shape"]
        np.testing.assert_allclose(image.affine, label.affine)
        loaded.append(np.asanyarray(label.dataobj))
    assert not np.array_equal(loaded[0], loaded[1])
    assert not any(p.name.startswith(".tmp") for p in json_path.parent.rglob("*"))


@pytest.mark.parametrize("orientation", ["LLS", "XYZ", "LP", "RASI"])
def test_bad_orientation(orientation: str) -> None:
    with pytest.raises(ValueError, match="orientation"):
        make_phantom(orientation=orientation, **SMALL)


def test_bad_arguments(default: Phantom, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        make_phantom(shape=(0, 10, 10))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom(spacing=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="ct.png"):
        save_phantom(default, tmp_path / "ct.png", tmp_path / "seg.nii.gz")
    with pytest.raises(ValueError, match="num_cases"):
        write_phantom_dataset(tmp_path, num_cases=0)


def test_does_not_import_click() -> None:
    imported = set()
    for node in ast.walk(ast.parse(Path(phantom_module.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "numpy" in imported and "click" not in imported
