"""Tests for dataset loading, fingerprinting, planning and preprocessing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import aff2axcodes

from medvit.pipelines.dataset_preprocessing import PreprocessConfig, preprocess_dataset
from medvit.pipelines.datasets import Case, DatasetSpec, load_dataset
from medvit.pipelines.errors import DatasetError, MedvitError
from medvit.pipelines.fingerprint import compute_fingerprint
from medvit.pipelines.planning import plan_from_fingerprint
from medvit.pipelines.phantom import LABELS, write_phantom_dataset

SHAPE = (48, 40, 20)
SPACING = (1.5, 1.5, 3.0)
FOREGROUND = {k: v for k, v in LABELS.items() if k != 0}
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _write_json(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def msd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three LPS phantoms in MSD layout; returns the dataset.json."""
    return write_phantom_dataset(tmp_path_factory.mktemp("msd") / "ds", 3, seed=1, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def preprocessed(msd: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetSpec, Path]:
    spec = load_dataset(msd)
    out = tmp_path_factory.mktemp("pre") / "out"
    return spec, preprocess_dataset(spec, out, progress=False)


def _absolute_training(msd: Path, resolve: bool = False) -> list[dict[str, str]]:
    """The dataset's training list with absolute paths, for a dataset.json written elsewhere."""
    entries = json.loads(msd.read_text())["training"]
    fix = (lambda p: str(p.resolve())) if resolve else str
    return [{"image": fix(msd.parent / e["image"]), "label": fix(msd.parent / e["label"])} for e in entries]


def _nnunet_from_msd(msd: Path, root: Path, labels: dict | None = None, channels: dict | None = None) -> Path:
    """An nnU-Net v2 copy of the phantom dataset: case_XXX_0000.nii.gz + labelsTr/case_XXX.nii.gz."""
    sources = sorted((msd.parent / "imagesTr").glob("case_*.nii.gz"))
    assert sources, f"no phantom cases under {msd.parent / 'imagesTr'}"
    for src in sources:
        name = src.name[: -len(".nii.gz")]
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / "imagesTr" / f"{name}_0000.nii.gz")
        shutil.copy(msd.parent / "labelsTr" / src.name, root / "labelsTr" / src.name)
    default_labels = {"background": 0, **{name: lid for lid, name in FOREGROUND.items()}}
    return _write_json(
        root / "dataset.json",
        {
            "channel_names": channels or {"0": "CT"},
            "labels": labels or default_labels,
            "numTraining": 3,
            "file_ending": ".nii.gz",
        },
    )


# ----------------------------------------------------------------------------- loading


def test_load_msd(msd: Path) -> None:
    spec = load_dataset(msd)
    assert spec.layout == "msd"
    assert spec.name == "medvit_phantom"
    assert spec.modality == "CT"
    assert spec.labels == FOREGROUND
    assert spec.label_ids == [1, 2, 3, 4]
    assert spec.class_names == ["liver", "spleen", "kidney_right", "kidney_left"]
    assert [c.name for c in spec.cases] == ["case_000", "case_001", "case_002"]
    assert spec.cases[1].image == msd.parent / "./imagesTr/case_001.nii.gz"
    assert spec.cases[1].label == msd.parent / "./labelsTr/case_001.nii.gz"
    assert spec.remapped is False and spec.preprocessing is None
    # The folder and the json file name the same dataset.
    assert load_dataset(msd.parent) == spec
    assert load_dataset(str(msd)) == spec


def test_load_msd_absolute_paths_and_mr_modality(msd: Path, tmp_path: Path) -> None:
    data = json.loads(msd.read_text())
    data["modality"] = {"0": "MRI"}
    data["training"] = _absolute_training(msd, resolve=True)
    spec = load_dataset(_write_json(tmp_path / "elsewhere" / "dataset.json", data))
    assert spec.modality == "MR"
    assert spec.root == tmp_path / "elsewhere"
    assert spec.cases[0].image == (msd.parent / "imagesTr" / "case_000.nii.gz").resolve()


def test_load_nnunet(msd: Path, tmp_path: Path) -> None:
    spec = load_dataset(_nnunet_from_msd(msd, tmp_path / "Dataset001_Phantom"))
    assert spec.layout == "nnunet"
    assert spec.name == "Dataset001_Phantom"
    assert spec.modality == "CT"
    assert spec.labels == FOREGROUND
    assert [c.name for c in spec.cases] == ["case_000", "case_001", "case_002"]
    assert spec.cases[2].image == tmp_path / "Dataset001_Phantom" / "imagesTr" / "case_002_0000.nii.gz"
    assert spec.cases[2].label == tmp_path / "Dataset001_Phantom" / "labelsTr" / "case_002.nii.gz"


def test_load_nnunet_mr_and_listed_cases(msd: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    json_path = _nnunet_from_msd(msd, root, channels={"0": "T2"})
    assert load_dataset(root).modality == "MR"
    data = json.loads(json_path.read_text())
    data["dataset"] = {"only": {"images": ["./imagesTr/case_001_0000.nii.gz"], "label": "./labelsTr/case_001.nii.gz"}}
    spec = load_dataset(_write_json(json_path, data))
    assert [(c.name, c.image.name, c.label.name) for c in spec.cases] == [
        ("only", "case_001_0000.nii.gz", "case_001.nii.gz")
    ]


def test_non_contiguous_label_ids(msd: Path, tmp_path: Path) -> None:
    labels = {"0": "background", "1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver"}
    data = json.loads(msd.read_text())
    data["labels"] = labels
    data["training"] = _absolute_training(msd)
    spec = load_dataset(_write_json(tmp_path / "msd" / "dataset.json", data))
    assert spec.labels == {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
    assert spec.label_ids == [1, 2, 3, 5]
    assert spec.class_names == ["spleen", "kidney_right", "kidney_left", "liver"]

    nn_labels = {"background": 0, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5}
    nn = _nnunet_from_msd(msd, tmp_path / "nn", labels=nn_labels)
    assert load_dataset(nn).labels == spec.labels


def _error_cases(msd: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Broken datasets: name -> (path given to load_dataset, text the message must contain)."""
    good = json.loads(msd.read_text())
    abs_training = _absolute_training(msd)

    def msd_json(name: str, **changes: object) -> Path:
        data = {**good, "training": abs_training, **changes}
        data = {k: v for k, v in data.items() if v is not None}
        return _write_json(tmp / name / "dataset.json", data)

    cases: dict[str, tuple[Path, str]] = {}
    cases["missing path"] = (tmp / "absent" / "dataset.json", "absent/dataset.json")
    (tmp / "empty").mkdir()
    cases["folder without json"] = (tmp / "empty", "empty")
    (tmp / "badjson").mkdir()
    (tmp / "badjson" / "dataset.json").write_text('{"labels": {"1": "liver",}')
    cases["invalid json"] = (tmp / "badjson", "badjson/dataset.json")
    cases["not an object"] = (_write_json(tmp / "list" / "dataset.json", [1, 2]), "list/dataset.json")
    cases["labels missing"] = (msd_json("nolabels", labels=None), "nolabels/dataset.json")
    cases["only background"] = (msd_json("bgonly", labels={"0": "background"}), "bgonly/dataset.json")
    cases["bad label id"] = (msd_json("badid", labels={"0": "background", "one": "liver"}), "badid/dataset.json")
    cases["no training"] = (msd_json("notrain", training=[]), "notrain/dataset.json")
    cases["training missing"] = (msd_json("notrain2", training=None), "notrain2/dataset.json")
    cases["case without label"] = (
        msd_json("nolabel", training=[{"image": abs_training[0]["image"]}]), "nolabel/dataset.json"
    )
    missing_image = [{**abs_training[0], "image": str(tmp / "gone" / "img.nii.gz")}]
    cases["missing image"] = (msd_json("noimg", training=missing_image), str(tmp / "gone" / "img.nii.gz"))
    missing_label = [{**abs_training[0], "label": str(tmp / "gone" / "lab.nii.gz")}]
    cases["missing label"] = (msd_json("nolab", training=missing_label), str(tmp / "gone" / "lab.nii.gz"))
    cases["multi-modal msd"] = (msd_json("mm", modality={"0": "FLAIR", "1": "T1w"}), "mm/dataset.json")

    nn_regions = _nnunet_from_msd(msd, tmp / "regions", labels={"background": 0, "whole": [1, 2], "core": 2})
    cases["nnunet regions"] = (nn_regions, "regions/dataset.json")
    nn_two = _nnunet_from_msd(msd, tmp / "twochan", channels={"0": "T1", "1": "T2"})
    cases["nnunet two channels"] = (nn_two, "twochan/dataset.json")
    nn_extra = _nnunet_from_msd(msd, tmp / "extrachan")
    extra_dir = tmp / "extrachan" / "imagesTr"
    shutil.copy(extra_dir / "case_000_0000.nii.gz", extra_dir / "case_000_0001.nii.gz")
    cases["nnunet second channel file"] = (nn_extra, "case_000_0001.nii.gz")
    nn_nolabel = _nnunet_from_msd(msd, tmp / "nnnolabel")
    (tmp / "nnnolabel" / "labelsTr" / "case_001.nii.gz").unlink()
    cases["nnunet missing label"] = (nn_nolabel, "nnnolabel/labelsTr/case_001.nii.gz")
    nn_noimages = _nnunet_from_msd(msd, tmp / "nnnoimages")
    shutil.rmtree(tmp / "nnnoimages" / "imagesTr")
    cases["nnunet no imagesTr"] = (nn_noimages, "nnnoimages/imagesTr")
    nn_dup = _nnunet_from_msd(msd, tmp / "dup", labels={"background": 0, "liver": 1, "spleen": 1})
    cases["nnunet duplicate id"] = (nn_dup, "dup/dataset.json")
    nn_ignore = _nnunet_from_msd(msd, tmp / "ignore", labels={"background": 0, "liver": 1, "ignore": 2})
    cases["nnunet ignore label"] = (nn_ignore, "ignore/dataset.json")
    nn_listed = _nnunet_from_msd(msd, tmp / "badname")
    listed = {"../escape": {"images": ["./imagesTr/case_000_0000.nii.gz"], "label": "./labelsTr/case_000.nii.gz"}}
    _write_json(nn_listed, {**json.loads(nn_listed.read_text()), "dataset": listed})
    cases["unusable case name"] = (nn_listed, "badname/dataset.json")
    nn_mixed = _nnunet_from_msd(msd, tmp / "mixed", labels={"background": 0, "liver": "one"})
    cases["labels neither direction"] = (nn_mixed, "mixed/dataset.json")
    return cases


ERROR_NAMES = [
    "missing path", "folder without json", "invalid json", "not an object", "labels missing", "only background",
    "bad label id", "no training", "training missing", "case without label", "missing image", "missing label",
    "multi-modal msd", "nnunet regions", "nnunet two channels", "nnunet second channel file",
    "nnunet missing label", "nnunet no imagesTr", "nnunet duplicate id", "nnunet ignore label",
    "labels neither direction", "unusable case name",
]  # fmt: skip


@pytest.fixture(scope="module")
def error_cases(msd: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    cases = _error_cases(msd, tmp_path_factory.mktemp("broken"))
    assert sorted(cases) == sorted(ERROR_NAMES)
    return cases


@pytest.mark.parametrize("name", ERROR_NAMES)
def test_load_errors(name: str, error_cases: dict[str, tuple[Path, str]]) -> None:
    path, expected = error_cases[name]
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert isinstance(info.value, MedvitError)
    assert "\n" not in message
    assert expected in message
    if name == "nnunet regions":
        assert "region" in message
    if name == "invalid json":
        assert "invalid JSON" in message
    if name.startswith("missing") and name != "missing path":
        assert "does not exist" in message


# ------------------------------------------------------------------------- fingerprint


def test_fingerprint_matches_files(msd: Path) -> None:
    spec = load_dataset(msd)
    fp = compute_fingerprint(spec)
    assert fp["num_cases"] == 3
    assert fp["modality"] == "CT"
    assert fp["median_spacing"] == pytest.approx(SPACING)
    assert fp["spacings"] == [pytest.approx(SPACING)] * 3
    assert fp["shapes"] == [list(SHAPE)] * 3
    assert fp["median_shape"] == list(SHAPE)
    assert fp["orientations"] == ["LPS"] * 3
    assert fp["labels"] == {str(k): v for k, v in FOREGROUND.items()}

    labels = [_array(c.label) for c in spec.cases]
    images = [_array(c.image) for c in spec.cases]
    voxel_ml = float(np.prod(SPACING)) / 1000.0
    for lid in FOREGROUND:
        count = sum(int(np.count_nonzero(lab == lid)) for lab in labels)
        assert count > 0
        assert fp["label_voxels"][str(lid)] == count
        assert fp["label_volume_ml"][str(lid)] == pytest.approx(count * voxel_ml, abs=1e-3)
        assert fp["label_volume_ml_mean"][str(lid)] == pytest.approx(count * voxel_ml / 3, abs=1e-3)

    # Each phantom has more foreground than the 10k-voxel sample: the pool is 3 x 10k
    # voxels drawn from the true foreground values.
    foreground = [img[lab > 0].astype(float) for img, lab in zip(images, labels)]
    assert all(f.size > 10_000 for f in foreground)
    stats = fp["intensity"]
    everything = np.concatenate(foreground)
    assert stats["num_samples"] == 30_000
    assert everything.min() <= stats["min"] <= stats["percentile_00_5"] <= stats["median"]
    assert stats["median"] <= stats["percentile_99_5"] <= stats["max"] <= everything.max()
    assert stats["median"] == pytest.approx(np.median(everything), abs=5.0)
    assert stats["mean"] == pytest.approx(everything.mean(), abs=2.0)
    assert stats["std"] == pytest.approx(everything.std(), rel=0.05)

    assert json.loads(json.dumps(fp)) == fp
    assert fp["suggested"] == plan_from_fingerprint(fp)
    assert compute_fingerprint(spec) == fp  # seeded sampling


def test_fingerprint_exact_intensity_without_sampling(tmp_path: Path) -> None:
    # Coarse phantoms have fewer than 10k foreground voxels: every one is used.
    json_path = write_phantom_dataset(tmp_path / "ds", 2, seed=3, shape=(24, 20, 10), spacing=(3.0, 3.0, 6.0))
    spec = load_dataset(json_path)
    fp = compute_fingerprint(spec)
    values = np.concatenate([_array(c.image)[_array(c.label) > 0].astype(float) for c in spec.cases])
    assert 0 < values.size < 20_000
    stats = fp["intensity"]
    assert stats["num_samples"] == values.size
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["std"] == pytest.approx(values.std())
    assert stats["min"] == values.min() and stats["max"] == values.max()
    p005, p50, p995 = np.percentile(values, [0.5, 50, 99.5])
    assert (stats["percentile_00_5"], stats["median"], stats["percentile_99_5"]) == pytest.approx((p005, p50, p995))


def test_fingerprint_axes_are_ras_and_max_cases(tmp_path: Path) -> None:
    # Voxel axes i->A, j->L, k->S: along RAS x, y, z the spacing is (j, i, k).
    json_path = write_phantom_dataset(
        tmp_path / "ds", 3, seed=4, shape=(20, 24, 10), spacing=(2.0, 3.0, 6.0), orientation="ALS"
    )
    spec = load_dataset(json_path)
    fp = compute_fingerprint(spec, max_cases=2)
    assert fp["num_cases"] == 2
    assert fp["orientations"] == ["ALS", "ALS"]
    assert fp["median_spacing"] == pytest.approx([3.0, 2.0, 6.0])
    assert fp["median_shape"] == [24, 20, 10]
    chosen = [spec.cases[0], spec.cases[2]]  # spread over the list
    count = sum(int(np.count_nonzero(_array(c.label) == 1)) for c in chosen)
    assert fp["label_voxels"]["1"] == count
    with pytest.raises(DatasetError):
        compute_fingerprint(spec, max_cases=0)


def test_fingerprint_label_shape_mismatch(msd: Path, tmp_path: Path) -> None:
    spec = load_dataset(msd)
    bad_label = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), str(bad_label))
    spec.cases = [Case("x", spec.cases[0].image, bad_label)]
    with pytest.raises(DatasetError, match="lab.nii.gz: label shape"):
        compute_fingerprint(spec)


def test_fingerprint_unreadable_scan_is_dataset_error(msd: Path, tmp_path: Path) -> None:
    spec = load_dataset(msd)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti at all")
    spec.cases = [Case("x", broken, spec.cases[0].label)]
    with pytest.raises(DatasetError, match="broken.nii.gz"):
        compute_fingerprint(spec)


# ---------------------------------------------------------------------------- planning


def _fp(median_spacing: list[float], median_shape: list[float], spacings: list[list[float]] | None = None) -> dict:
    return {"median_spacing": median_spacing, "median_shape": median_shape, "spacings": spacings or [median_spacing]}


def test_plan_isotropic_caps_voxels() -> None:
    plan = plan_from_fingerprint(_fp([1.0, 1.0, 1.0], [200, 180, 150]))
    assert plan["spacing"] == [1.0, 1.0, 1.0]
    # 192 x 176 x 144 after rounding; the largest axis shrinks by 16 until <= 96^3.
    assert plan["patch_size"] == [96, 96, 96]


def test_plan_small_volume_rounds_down_with_minimum() -> None:
    plan = plan_from_fingerprint(_fp([0.8, 0.8, 1.0], [70, 47, 9]))
    assert plan["spacing"] == [0.8, 0.8, 1.0]
    assert plan["patch_size"] == [64, 32, 16]


def test_plan_anisotropic_uses_tenth_percentile() -> None:
    spacings = [[0.7, 0.7, 5.0], [0.8, 0.8, 3.0], [0.75, 0.75, 4.0], [0.8, 0.8, 5.0], [0.7, 0.7, 2.5]]
    shapes = [[512, 512, 40], [512, 512, 60], [512, 512, 50], [512, 512, 30], [512, 512, 80]]
    median_spacing = np.median(spacings, axis=0).tolist()
    median_shape = np.median(shapes, axis=0).tolist()
    assert max(median_spacing) / min(median_spacing) > 3
    plan = plan_from_fingerprint(_fp(median_spacing, median_shape, spacings))
    z = float(np.percentile([s[2] for s in spacings], 10))  # 2.7 mm
    assert plan["spacing"] == pytest.approx([0.75, 0.75, z])
    # z extent 50 x 4.0 mm = 200 mm at 2.7 mm is 74 voxels -> 64; x, y shrink to fit the cap.
    patch = plan["patch_size"]
    assert patch[2] == 64
    assert all(p % 16 == 0 and p >= 16 for p in patch)
    assert np.prod(patch) <= 96**3
    assert patch == [112, 112, 64]


def test_plan_anisotropic_never_finer_than_other_axes() -> None:
    spacings = [[1.0, 1.0, 0.6]] * 2 + [[1.0, 1.0, 5.0]] * 8
    assert np.percentile([s[2] for s in spacings], 10) == pytest.approx(0.6)
    plan = plan_from_fingerprint(_fp([1.0, 1.0, 5.0], [100, 100, 20], spacings))
    assert plan["spacing"] == [1.0, 1.0, 1.0]


def test_plan_ratio_three_is_not_anisotropic() -> None:
    spacings = [[1.0, 1.0, 3.0], [1.0, 1.0, 1.0], [1.0, 1.0, 3.0]]
    assert plan_from_fingerprint(_fp([1.0, 1.0, 3.0], [64, 64, 32], spacings))["spacing"] == [1.0, 1.0, 3.0]


def test_plan_custom_cap_and_multiple() -> None:
    plan = plan_from_fingerprint(_fp([1.0, 1.0, 1.0], [300, 300, 300]), max_patch_voxels=64**3, patch_multiple=32)
    assert plan["patch_size"] == [64, 64, 64]
    with pytest.raises(DatasetError):
        plan_from_fingerprint(_fp([1.0, 1.0, 1.0], [300, 300, 300]), max_patch_voxels=15**3)
    with pytest.raises(DatasetError, match="median_shape"):
        plan_from_fingerprint({"median_spacing": [1.0, 1.0, 1.0], "spacings": [[1.0, 1.0, 1.0]]})
    with pytest.raises(DatasetError):
        plan_from_fingerprint(_fp([1.0, 0.0, 1.0], [64, 64, 64]))


# ----------------------------------------------------------------------- preprocessing


def _world_centroid(label: np.ndarray, affine: np.ndarray, value: int) -> np.ndarray:
    ijk = np.argwhere(label == value).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def test_preprocess_outputs(preprocessed: tuple[DatasetSpec, Path]) -> None:
    spec, out = preprocessed
    fp = json.loads((out / "fingerprint.json").read_text())
    assert fp == compute_fingerprint(spec)
    target = fp["suggested"]["spacing"]
    assert target == pytest.approx(SPACING)
    for case in spec.cases:
        img = nib.load(str(out / "imagesTr" / f"{case.name}.nii.gz"))
        lab = nib.load(str(out / "labelsTr" / f"{case.name}.nii.gz"))
        assert img.get_data_dtype() == np.float32
        assert lab.get_data_dtype() == np.uint8
        assert img.header.get_zooms() == pytest.approx(target)
        assert aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(lab.affine, img.affine)
        assert img.shape == lab.shape == SHAPE  # LPS -> RAS flips, same spacing
        image = np.asarray(img.dataobj)
        labels = np.asarray(lab.dataobj)
        assert 0.0 <= image.min() and image.max() <= 1.0  # ct window scaled to 0..1
        assert set(np.unique(labels)) <= set(range(len(spec.label_ids) + 1))
        # Same spacing, only a flip: each class keeps its voxels and its world position.
        source = _array(case.label)
        source_affine = nib.load(str(case.label)).affine
        for cls, lid in enumerate(spec.label_ids, start=1):
            assert np.count_nonzero(labels == cls) == np.count_nonzero(source == lid)
            np.testing.assert_allclose(
                _world_centroid(labels, lab.affine, cls), _world_centroid(source, source_affine, lid), atol=1e-3
            )
    assert not list(out.rglob(".tmp-*"))


def test_preprocess_manifest_and_round_trip(preprocessed: tuple[DatasetSpec, Path]) -> None:
    spec, out = preprocessed
    manifest = json.loads((out / "medvit_preprocessed.json").read_text())
    assert manifest["name"] == "medvit_phantom"
    assert manifest["modality"] == "CT"
    assert manifest["labels"] == {str(c): {"id": lid, "name": FOREGROUND[lid]} for c, lid in enumerate([1, 2, 3, 4], 1)}
    assert manifest["preprocessing"] == {
        "spacing": list(SPACING), "intensity": "ct", "ct_window": [-175.0, 250.0], "orientation": "RAS"
    }  # fmt: skip
    assert manifest["plan"] == {"spacing": list(SPACING), "patch_size": [48, 32, 16]}
    assert manifest["cases"] == [
        {"name": c.name, "image": f"imagesTr/{c.name}.nii.gz", "label": f"labelsTr/{c.name}.nii.gz"} for c in spec.cases
    ]
    assert manifest["source"] == str(spec.root.resolve())

    loaded = load_dataset(out)
    assert loaded.layout == "preprocessed"
    assert loaded.remapped is True
    assert loaded.labels == spec.labels
    assert loaded.label_ids == spec.label_ids
    assert loaded.modality == "CT"
    assert loaded.preprocessing == manifest["preprocessing"]
    assert [(c.name, c.image, c.label) for c in loaded.cases] == [
        (c.name, out / f"imagesTr/{c.name}.nii.gz", out / f"labelsTr/{c.name}.nii.gz") for c in spec.cases
    ]
    assert load_dataset(out / "medvit_preprocessed.json") == loaded
    # Counting a remapped dataset maps class indices back to the original ids.
    assert compute_fingerprint(loaded)["label_voxels"] == compute_fingerprint(spec)["label_voxels"]
    with pytest.raises(DatasetError, match="already a preprocessed dataset"):
        preprocess_dataset(loaded, out.parent / "again", progress=False)


def test_preprocess_non_contiguous_and_explicit_spacing(msd: Path, tmp_path: Path) -> None:
    # Relabel phantom organ 4 as 5: ids 1, 2, 3, 5 become classes 1..4.
    (tmp_path / "ds" / "imagesTr").mkdir(parents=True)
    (tmp_path / "ds" / "labelsTr").mkdir(parents=True)
    src = nib.load(str(msd.parent / "labelsTr" / "case_000.nii.gz"))
    source = np.asarray(src.dataobj).copy()
    source[source == 4] = 5
    nib.save(nib.Nifti1Image(source, src.affine, src.header), str(tmp_path / "ds" / "labelsTr" / "a.nii.gz"))
    shutil.copy(msd.parent / "imagesTr" / "case_000.nii.gz", tmp_path / "ds" / "imagesTr" / "a.nii.gz")
    labels = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_right", "5": "kidney_left"}
    training = [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]
    data = {"labels": labels, "training": training, "modality": {"0": "MRI"}}
    spec = load_dataset(_write_json(tmp_path / "ds" / "dataset.json", data))

    out = preprocess_dataset(spec, tmp_path / "out", PreprocessConfig(spacing=(3.0, 3.0, 3.0)), progress=False)
    img = nib.load(str(out / "imagesTr" / "a.nii.gz"))
    lab = np.asarray(nib.load(str(out / "labelsTr" / "a.nii.gz")).dataobj)
    assert img.header.get_zooms() == pytest.approx((3.0, 3.0, 3.0))
    assert aff2axcodes(img.affine) == ("R", "A", "S")
    # 48 x 1.5 mm = 72 mm -> 24 voxels at 3 mm; 40 x 1.5 -> 20; 20 x 3 -> 20.
    assert img.shape == (24, 20, 20)
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    # Volume is kept by nearest-neighbour resampling to within a few percent.
    kidney_ml = np.count_nonzero(lab == 4) * 27.0 / 1000
    assert kidney_ml == pytest.approx(np.count_nonzero(source == 5) * 6.75 / 1000, rel=0.15)

    manifest = json.loads((out / "medvit_preprocessed.json").read_text())
    assert manifest["labels"]["4"] == {"id": 5, "name": "kidney_left"}
    assert manifest["preprocessing"]["intensity"] == "mr"  # the MR modality's default
    image = np.asarray(img.dataobj)
    nonzero = image[image != 0]
    assert nonzero.mean() == pytest.approx(0.0, abs=0.05) and nonzero.std() == pytest.approx(1.0, abs=0.05)
    loaded = load_dataset(out)
    assert loaded.labels == {1: "liver", 2: "spleen", 3: "kidney_right", 5: "kidney_left"}
    assert loaded.label_ids == [1, 2, 3, 5]


def test_preprocess_refuses_to_overwrite_source(msd: Path, tmp_path: Path) -> None:
    spec = load_dataset(msd)
    with pytest.raises(DatasetError, match="source dataset's folder"):
        preprocess_dataset(spec, msd.parent, progress=False)
    assert not (msd.parent / "medvit_preprocessed.json").exists()


def test_preprocess_bad_case_leaves_no_manifest(msd: Path, tmp_path: Path) -> None:
    spec = load_dataset(msd)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"garbage")
    spec.cases = [spec.cases[0], Case("bad", broken, spec.cases[1].label)]
    with pytest.raises(DatasetError, match="broken.nii.gz"):
        preprocess_dataset(spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "medvit_preprocessed.json").exists()
    assert not list(tmp_path.rglob(".tmp-*"))


def test_preprocess_config_rejects_bad_intensity(msd: Path, tmp_path: Path) -> None:
    with pytest.raises(MedvitError, match="intensity"):
        preprocess_dataset(load_dataset(msd), tmp_path / "out", PreprocessConfig(intensity="hu"), progress=False)


# ---------------------------------------------------------------------------- real CT


def test_real_ct_fingerprint(tmp_path: Path) -> None:
    ct, seg = SHARED_DATA / "ct" / "example_ct_sm.nii.gz", SHARED_DATA / "ct" / "example_seg.nii.gz"
    if not (ct.exists() and seg.exists()):
        pytest.skip(f"real CT example not found under {SHARED_DATA / 'ct'} (a clone outside the workplace)")
    labels = {"0": "background", "1": "spleen", "2": "kidney_right", "3": "kidney_left", "5": "liver"}
    json_path = _write_json(
        tmp_path / "dataset.json",
        {
            "name": "real",
            "modality": {"0": "CT"},
            "labels": labels,
            "training": [{"image": str(ct), "label": str(seg)}],
        },
    )
    spec = load_dataset(json_path)
    assert spec.label_ids == [1, 2, 3, 5]
    fp = compute_fingerprint(spec)
    assert fp["median_spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert fp["median_shape"] == [122, 101, 30]
    seg_array = _array(seg)
    for lid in (1, 2, 3, 5):
        assert fp["label_voxels"][str(lid)] == np.count_nonzero(seg_array == lid)
    assert fp["label_voxels"]["5"] > 0
    assert fp["label_volume_ml"]["5"] == pytest.approx(np.count_nonzero(seg_array == 5) * 27.0 / 1000, abs=1e-3)
    # Soft-tissue organs: the foreground median is in the soft-tissue HU range.
    assert -100 < fp["intensity"]["median"] < 300
    assert fp["suggested"]["spacing"] == [3.0, 3.0, 3.0]
    assert all(p % 16 == 0 for p in fp["suggested"]["patch_size"])
