"""Dataset verification: every kind of problem found, named by its file, all listed at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvit.pipelines.datasets import load_dataset
from medvit.pipelines.verify import DatasetProblems, verified_dataset, verify_dataset

SHAPE = (10, 8, 6)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
LABELS = {"0": "background", "1": "liver", "2": "spleen"}


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))
    return path


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, SHAPE).astype(np.int16)


def label() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:5, 2:5, 1:3] = 1
    lab[6:9, 4:7, 2:5] = 2
    return lab


def msd(root: Path, n: int = 3) -> Path:
    """A clean MSD dataset of n cases with distinct images."""
    training = []
    for i in range(n):
        save(root / "imagesTr" / f"case_{i}.nii.gz", image(i))
        save(root / "labelsTr" / f"case_{i}.nii.gz", label())
        training.append({"image": f"./imagesTr/case_{i}.nii.gz", "label": f"./labelsTr/case_{i}.nii.gz"})
    return write_json(root, training)


def write_json(root: Path, training: list[dict], **extra) -> Path:
    data = {"name": "tiny", "modality": {"0": "CT"}, "labels": LABELS, "numTraining": len(training),
            "training": training, **extra}  # fmt: skip
    path = root / "dataset.json"
    path.write_text(json.dumps(data))
    return path


def only(problems, file: Path, fragment: str, warning: bool = False):
    assert len(problems) == 1, [str(p) for p in problems]
    p = problems[0]
    assert p.file == file, str(p)
    assert fragment in p.message, str(p)
    assert p.warning is warning
    assert str(p) == f"{file}: {p.message}"
    return p


def test_clean_dataset_passes(tmp_path, monkeypatch) -> None:
    from medvit.pipelines import io, verify

    js = msd(tmp_path)
    read = []

    def counting(path):
        read.append(Path(path))
        return io.read_scan(path)

    monkeypatch.setattr(verify, "read_scan", counting)
    assert verify_dataset(js) == []
    # integer NIfTI images are judged by their headers; labels are read for their values
    assert sorted(p.parent.name for p in read) == ["labelsTr"] * 3
    monkeypatch.undo()
    spec, warnings = verified_dataset(js, "nothing was done")
    assert warnings == [] and [c.name for c in spec.cases] == ["case_0", "case_1", "case_2"]


def test_label_on_another_grid(tmp_path) -> None:
    js = msd(tmp_path)
    lab1, lab2 = tmp_path / "labelsTr" / "case_1.nii.gz", tmp_path / "labelsTr" / "case_2.nii.gz"
    save(lab1, label()[:, :, :5])
    only(verify_dataset(js), lab1, "label shape (10, 8, 5) differs from its image's (10, 8, 6)")
    save(lab1, label())
    shifted = AFFINE.copy()
    shifted[0, 3] = 2.0  # a label saved from another crop: 2 mm off
    save(lab2, label(), shifted)
    only(verify_dataset(js), lab2, "not on its image's grid (affines differ by up to 2 mm)")
    # float32 header rounding is not a different grid
    save(lab2, label(), AFFINE + 1e-5)
    assert verify_dataset(js) == []


def test_undeclared_and_non_integer_label_values(tmp_path) -> None:
    js = msd(tmp_path)
    lab = tmp_path / "labelsTr" / "case_0.nii.gz"
    bad = label()
    bad[0, 0, 0] = 7
    save(lab, bad)
    only(verify_dataset(js), lab, "label values 7 are not declared labels (0, 1, 2)")
    save(lab, label().astype(np.float32) * 0.5)
    only(verify_dataset(js), lab, "non-integer values")
    wide = label().astype(np.int16)
    wide[0, 0, 0] = -1
    save(lab, wide)
    only(verify_dataset(js), lab, "label values -1 are not declared")


def test_empty_label_map_is_a_warning(tmp_path) -> None:
    js = msd(tmp_path)
    lab = save(tmp_path / "labelsTr" / "case_2.nii.gz", np.zeros(SHAPE, np.uint8))
    only(verify_dataset(js), lab, "empty (background only)", warning=True)
    spec, warnings = verified_dataset(js, "x")  # a warning does not refuse the dataset
    assert len(spec.cases) == 3 and len(warnings) == 1


def test_channels_and_non_finite_intensities(tmp_path) -> None:
    js = msd(tmp_path)
    img = tmp_path / "imagesTr" / "case_1.nii.gz"
    save(img, np.stack([image(1), image(9)], axis=-1))
    only(verify_dataset(js), img, "has 2 channels (shape (10, 8, 6, 2)); the dataset declares 1")
    nan = image(1).astype(np.float32)
    nan[3, 3, 3], nan[4, 4, 4] = np.nan, np.inf
    save(img, nan)
    only(verify_dataset(js), img, "2 NaN/infinite voxels")
    # a trailing singleton axis is one channel, not two
    save(img, image(1)[..., None])
    assert verify_dataset(js) == []


@pytest.mark.parametrize("kind", ["empty", "text", "truncated gz", "truncated nii"])
def test_unreadable_image(tmp_path, kind) -> None:
    js = msd(tmp_path)
    img = tmp_path / "imagesTr" / "case_0.nii.gz"
    if kind == "empty":
        img.write_bytes(b"")
    elif kind == "text":
        img.write_text("not an image\n")
    elif kind == "truncated gz":
        raw = img.read_bytes()
        img.write_bytes(raw[: len(raw) * 2 // 3])
    else:
        img = save(tmp_path / "imagesTr" / "case_0.nii", image(0))
        img.write_bytes(img.read_bytes()[:-100])
        data = json.loads(js.read_text())
        data["training"][0]["image"] = "./imagesTr/case_0.nii"
        js.write_text(json.dumps(data))
    problems = verify_dataset(js)
    assert [p.file for p in problems] == [img], [str(p) for p in problems]
    assert not problems[0].warning


def test_duplicate_cases(tmp_path) -> None:
    js = msd(tmp_path)
    data = json.loads(js.read_text())
    # the same files listed under a second entry (a different name: the case names differ)
    shutil.copy(tmp_path / "imagesTr" / "case_0.nii.gz", tmp_path / "imagesTr" / "copy_of_0.nii.gz")
    data["training"].append({"image": "./imagesTr/copy_of_0.nii.gz", "label": "./labelsTr/case_1.nii.gz"})
    data["numTraining"] = 4
    js.write_text(json.dumps(data))
    problems = verify_dataset(js)
    texts = sorted(str(p) for p in problems)
    assert len(problems) == 2, texts
    label1 = tmp_path / "labelsTr" / "case_1.nii.gz"
    assert any(p.file == label1 and "listed twice" in p.message and "'copy_of_0'" in p.message for p in problems)
    copy = tmp_path / "imagesTr" / "copy_of_0.nii.gz"
    assert any(p.file == copy and "same content as" in p.message and "case_0.nii.gz" in p.message for p in problems)


def test_missing_files_are_each_listed(tmp_path) -> None:
    js = msd(tmp_path)
    (tmp_path / "labelsTr" / "case_0.nii.gz").unlink()
    (tmp_path / "imagesTr" / "case_2.nii.gz").unlink()
    problems = verify_dataset(js)
    assert [(p.file.name, "does not exist" in p.message) for p in problems] == [
        ("case_0.nii.gz", True), ("case_2.nii.gz", True)
    ]
    assert problems[0].file.parent.name == "labelsTr" and problems[1].file.parent.name == "imagesTr"


def test_several_problems_all_listed(tmp_path) -> None:
    js = msd(tmp_path, n=5)
    bad = label()
    bad[0, 0, 0] = 9
    save(tmp_path / "labelsTr" / "case_0.nii.gz", bad)
    save(tmp_path / "labelsTr" / "case_1.nii.gz", label()[:4])
    (tmp_path / "imagesTr" / "case_3.nii.gz").write_text("garbage")
    (tmp_path / "labelsTr" / "case_4.nii.gz").unlink()
    save(tmp_path / "labelsTr" / "case_2.nii.gz", np.zeros(SHAPE, np.uint8))
    problems = verify_dataset(js)
    errors = [(p.file.parent.name, p.file.name) for p in problems if not p.warning]
    assert sorted(errors) == [
        ("imagesTr", "case_3.nii.gz"), ("labelsTr", "case_0.nii.gz"), ("labelsTr", "case_1.nii.gz"),
        ("labelsTr", "case_4.nii.gz"),
    ]  # fmt: skip
    assert [p.file.name for p in problems if p.warning] == ["case_2.nii.gz"]
    with pytest.raises(DatasetProblems) as info:
        verified_dataset(js, "nothing was trained")
    err = info.value
    assert str(err) == f"{js}: 4 problems in 4 files (listed above); nothing was trained"
    assert len(err.details) == 5 and err.details[-1].startswith("warning: ") and "\n" not in str(err)


def nnunet(root: Path, n: int = 2, **extra) -> Path:
    for i in range(n):
        save(root / "imagesTr" / f"c{i}_0000.nii.gz", image(i))
        save(root / "labelsTr" / f"c{i}.nii.gz", label())
    data = {"name": "tiny", "channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
            "numTraining": n, "file_ending": ".nii.gz", **extra}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(data))
    return root / "dataset.json"


def test_nnunet_channel_files_and_strays(tmp_path) -> None:
    js = nnunet(tmp_path, n=3)
    assert verify_dataset(js) == []
    extra = [save(tmp_path / "imagesTr" / f"c{i}_0001.nii.gz", image(10 + i)) for i in (0, 2)]
    stray = save(tmp_path / "imagesTr" / "c9.nii.gz", image(20))
    problems = verify_dataset(js)
    assert [(p.file, p.warning) for p in problems] == [(extra[0], False), (extra[1], False), (stray, True)]
    assert "declares 1 channel" in problems[0].message and "belongs to no training case" in problems[2].message
    with pytest.raises(Exception, match="c0_0001"):  # loading alone still stops at the first
        load_dataset(js)


def test_nnunet_count_and_listed_channels(tmp_path) -> None:
    js = nnunet(tmp_path, n=2, numTraining=3)
    only(verify_dataset(js), js, "'numTraining' is 3 but 2 training cases were found", warning=True)
    data = json.loads(js.read_text())
    data["numTraining"] = 2
    data["dataset"] = {
        "c0": {"images": ["imagesTr/c0_0000.nii.gz", "imagesTr/c1_0000.nii.gz"], "label": "labelsTr/c0.nii.gz"},
        "c1": {"images": ["imagesTr/c1_0000.nii.gz"], "label": "labelsTr/c1.nii.gz"},
    }
    js.write_text(json.dumps(data))
    only(verify_dataset(js), js, "case 'c0' has 2 image channels")


def test_preprocessed_folder_labels_are_class_indices(tmp_path) -> None:
    from medvit.pipelines.dataset_preprocessing import PreprocessConfig, preprocess_dataset

    src = msd(tmp_path / "src", n=2)
    out = preprocess_dataset(load_dataset(src), tmp_path / "pre", PreprocessConfig(intensity="none"), progress=False)
    assert verify_dataset(out) == []
    lab = out / "labelsTr" / "case_1.nii.gz"
    img = nib.load(str(lab))
    bad = np.asarray(img.dataobj).copy()
    bad[0, 0, 0] = 3  # two labels: classes 0..2
    save(lab, bad, img.affine)
    only(verify_dataset(out), lab, "label values 3 are not declared labels (0, 1, 2)")


def test_bad_json_is_one_problem(tmp_path) -> None:
    js = tmp_path / "dataset.json"
    js.write_text("{not json")
    problems = verify_dataset(js)
    assert len(problems) == 1 and problems[0].file == js and "invalid JSON" in problems[0].message
