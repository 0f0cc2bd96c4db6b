"""Classification data: class trees and CSVs, kinds, loaded values, and one-line errors naming the file."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medvit.pipelines.classify_data import (
    ClassificationDataset,
    check_trainable,
    load_item,
    normalise,
    read_classification_data,
)
from medvit.pipelines.classify_load import frame_indices, resize, scale_intensity
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW

LO, HI = DEFAULT_CT_WINDOW


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def _dicom(path: Path, stored: np.ndarray, intercept: float = -1024.0) -> Path:
    """A single-frame signed 16-bit MONOCHROME2 DICOM image with a rescale intercept."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelData = stored.astype("<i2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _one_line_naming(exc: pytest.ExceptionInfo, name: str) -> str:
    text = str(exc.value)
    assert "\n" not in text and name in text, text
    return text


# --- class trees and CSVs ---------------------------------------------------------------------


def test_class_tree_sorted_classes_ids_and_image_kind(tmp_path: Path) -> None:
    gray = np.zeros((6, 6), np.uint8)
    for cls, names in {"tumour": ["b.png", "a.png"], "benign": ["c.jpg"], "normal": ["d.bmp"]}.items():
        for n in names:
            _png(tmp_path / cls / n, gray)
    (tmp_path / "tumour" / ".DS_Store").write_bytes(b"x")  # hidden litter is ignored
    data = read_classification_data(tmp_path)
    assert data.classes == ["benign", "normal", "tumour"]
    assert data.kind == "image"
    assert [(i.id, i.label) for i in data.items] == [
        ("benign/c.jpg", 0),
        ("normal/d.bmp", 1),
        ("tumour/a.png", 2),
        ("tumour/b.png", 2),
    ]
    check_trainable(data)


def test_integer_class_names_sort_numerically(tmp_path: Path) -> None:
    for cls in ("10", "2", "1"):
        _png(tmp_path / cls / "x.png", np.zeros((4, 4), np.uint8))
    assert read_classification_data(tmp_path).classes == ["1", "2", "10"]


def test_csv_relative_paths_labels_ids_and_unlabelled(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "img" / "b.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "train.csv").write_text("path,label,id\nimg/a.png,cat,case1\nimg/b.png,ant,\n")
    data = read_classification_data(tmp_path / "train.csv")
    assert data.classes == ["ant", "cat"]
    assert [(i.path, i.label, i.id) for i in data.items] == [
        (tmp_path / "img" / "a.png", 1, "case1"),
        (tmp_path / "img" / "b.png", 0, "img/b.png"),
    ]
    (tmp_path / "predict.csv").write_text("path\nimg/a.png\nimg/b.png\n")
    unlabelled = read_classification_data(tmp_path / "predict.csv")
    assert unlabelled.classes == [] and [i.label for i in unlabelled.items] == [None, None]
    with pytest.raises(MedvitError) as exc:
        check_trainable(unlabelled)
    assert "no labels" in _one_line_naming(exc, "predict.csv")
    ds = ClassificationDataset(unlabelled, size=(4, 4), in_chans=1)
    assert ds[1][1] == -1


def test_inferred_kinds(tmp_path: Path) -> None:
    _nifti(tmp_path / "n2" / "a" / "x.nii.gz", np.zeros((5, 6), np.float32))
    _nifti(tmp_path / "n2" / "b" / "y.nii", np.zeros((5, 6, 1), np.float32))  # trailing 1 dropped: 2D
    assert read_classification_data(tmp_path / "n2").kind == "image"
    _nifti(tmp_path / "n3" / "a" / "x.nii.gz", np.zeros((5, 6, 7), np.float32))
    assert read_classification_data(tmp_path / "n3").kind == "volume"
    for i in range(3):
        _png(tmp_path / "clips" / "a" / "clip1" / f"{i:03d}.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "clips" / "b").mkdir()
    _npy(tmp_path / "clips" / "b" / "clip2.npy", np.zeros((3, 4, 4, 3), np.uint8))
    assert read_classification_data(tmp_path / "clips").kind == "video"
    _dicom(tmp_path / "dcm" / "a" / "x.dcm", np.zeros((4, 4), np.int16))
    _png(tmp_path / "dcm" / "b" / "y.png", np.zeros((4, 4), np.uint8))
    assert read_classification_data(tmp_path / "dcm").kind == "image"


def test_3d_npy_is_ambiguous_until_kind_is_given(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        np.save(tmp_path / cls / "x.npy", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(MedvitError) as exc:
        read_classification_data(tmp_path)
    assert "say which kind" in _one_line_naming(exc, str(tmp_path))
    assert read_classification_data(tmp_path, kind="video").kind == "video"
    assert read_classification_data(tmp_path, kind="volume").kind == "volume"
    with pytest.raises(MedvitError) as exc:
        read_classification_data(tmp_path, kind="image")
    assert "is read as video or volume, not image (2 such item(s)" in _one_line_naming(exc, "x.npy")


@pytest.mark.parametrize(
    "make, fragment, name",
    [
        (lambda r: (r / "a").mkdir() or _png(r / "b" / "x.png", np.zeros((4, 4), np.uint8)), "empty class", "a"),
        (lambda r: _png(r / "x.png", np.zeros((4, 4), np.uint8)), "beside the class folders", "x.png"),
        (lambda r: (r / "a").mkdir() or (r / "a" / "notes.txt").write_text("x"), "unknown file type", "notes.txt"),
        (
            lambda r: _png(r / "a" / "x.png", np.zeros((4, 4), np.uint8)) and _nifti(r / "b" / "v.nii", np.zeros((3, 3, 3))),
            "different kinds",
            "v.nii",
        ),
        (lambda r: (r / "a").mkdir() or (r / "a" / "clip.mp4").write_bytes(b"\0" * 8), "no video decoder", "clip.mp4"),
        (lambda r: (r / "a" / "f").mkdir(parents=True) or (r / "a" / "f" / "x.txt").write_text(""), "neither", "f"),
        (lambda r: None, "no class folders", ""),
    ],
    ids=["empty-class", "stray-file", "unknown-ext", "mixed-kinds", "video-file", "odd-folder", "empty-root"],
)
def test_tree_errors_are_one_line_naming_the_file(tmp_path: Path, make, fragment: str, name: str) -> None:
    make(tmp_path)
    with pytest.raises(MedvitError) as exc:
        read_classification_data(tmp_path)
    assert fragment in _one_line_naming(exc, name)


def test_csv_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\nx.png,a\n")
    with pytest.raises(MedvitError) as exc:
        read_classification_data(bad)
    assert "no 'path' column (header: file, label)" in _one_line_naming(exc, "bad.csv")
    names = ["m1.png", "m2.png", "m3.png", "m4.png", "m5.png"]
    missing = tmp_path / "missing.csv"
    missing.write_text("path,label\n" + "".join(f"{n},a\n" for n in names))
    with pytest.raises(MedvitError) as exc:
        read_classification_data(missing)
    text = _one_line_naming(exc, "missing.csv")
    assert "5 item(s) not found" in text and "m3.png and 2 more" in text and "m4.png" not in text
    _png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    partial = tmp_path / "partial.csv"
    partial.write_text("path,label\na.png,x\na.png,\n")
    with pytest.raises(MedvitError) as exc:
        read_classification_data(partial)
    assert "empty label on line(s) 3" in _one_line_naming(exc, "partial.csv")
    dup = tmp_path / "dup.csv"
    dup.write_text("path,label\na.png,x\na.png,y\n")
    with pytest.raises(MedvitError) as exc:
        read_classification_data(dup)
    assert "duplicate ids: a.png" in _one_line_naming(exc, "dup.csv")
    one = tmp_path / "one.csv"
    one.write_text("path,label\na.png,x\n")
    with pytest.raises(MedvitError) as exc:
        check_trainable(read_classification_data(one))
    assert "at least 2 classes" in _one_line_naming(exc, "one.csv")


# --- loaded values ----------------------------------------------------------------------------


def test_8_and_16_bit_gray_scale_by_depth_and_replicate(tmp_path: Path) -> None:
    a8 = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    x = load_item(_png(tmp_path / "g8.png", a8), "image", (4, 5), in_chans=3)
    assert x.shape == (3, 4, 5) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(a8 / 255.0).float())
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    a16 = np.full((4, 5), 40000, np.uint16)
    x16 = load_item(_png(tmp_path / "g16.png", a16), "image", (4, 5), in_chans=1)
    torch.testing.assert_close(x16, torch.full((1, 4, 5), 40000 / 65535))
    # the documented normalised value of a known pixel: 190 -> (190/255 - 0.5) / 0.5
    assert a8[3, 4] == 190 and normalise(x)[2, 3, 4].item() == pytest.approx((190 / 255 - 0.5) / 0.5)


def test_rgb_to_one_channel_by_luminance_and_alpha_dropped(tmp_path: Path) -> None:
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 255, 100, 50, 7
    path = _png(tmp_path / "c.png", rgba)
    x1 = load_item(path, "image", (3, 3), in_chans=1)
    torch.testing.assert_close(x1, torch.full((1, 3, 3), (0.299 * 255 + 0.587 * 100 + 0.114 * 50) / 255))
    x3 = load_item(path, "image", (3, 3), in_chans=3)
    torch.testing.assert_close(x3[:, 0, 0], torch.tensor([255, 100, 50]) / 255.0)
    with pytest.raises(MedvitError) as exc:
        load_item(path, "image", (3, 3), in_chans=2)
    _one_line_naming(exc, "c.png")


def test_resize_keeps_a_constant_image_and_antialiases(tmp_path: Path) -> None:
    x = load_item(_png(tmp_path / "k.png", np.full((37, 53), 77, np.uint8)), "image", (16, 24), in_chans=1)
    assert x.shape == (1, 16, 24)
    torch.testing.assert_close(x, torch.full_like(x, 77 / 255))
    stripes = np.zeros((24, 24), np.uint8)
    stripes[:, ::2] = 255  # shrunk 3x, plain bilinear samples 0, 1, 0, 1 ...; antialiased it is near grey
    y = load_item(_png(tmp_path / "s.png", stripes), "image", (8, 8), in_chans=1)
    torch.testing.assert_close(y, torch.full_like(y, 0.5), atol=0.06, rtol=0)


def test_volume_resize_is_trilinear_when_growing_and_constant_stays(tmp_path: Path) -> None:
    v = torch.rand(1, 3, 4, 5)
    torch.testing.assert_close(resize(v, (6, 8, 10)), F.interpolate(v[None], (6, 8, 10), mode="trilinear")[0])
    path = _nifti(tmp_path / "v.nii.gz", np.full((9, 10, 11), 3.0, np.float32))
    x = load_item(path, "volume", (4, 5, 6), in_chans=2)
    assert x.shape == (2, 4, 5, 6)
    assert torch.all(x == 0)  # constant non-CT volume: percentile range empty -> 0


def test_percentile_rule_on_a_float_image(tmp_path: Path) -> None:
    ramp = np.linspace(0.0, 1000.0, 201, dtype=np.float32).reshape(1, 201).repeat(3, 0)
    x = load_item(_nifti(tmp_path / "r.nii.gz", ramp), "image", (3, 201), in_chans=1)
    lo, hi = np.percentile(ramp, (0.5, 99.5))
    torch.testing.assert_close(x[0], torch.from_numpy(np.clip((ramp - lo) / (hi - lo), 0, 1)).float())
    assert x.min() == 0 and x.max() == 1


def test_dicom_image_rescaled_then_hu_window(tmp_path: Path) -> None:
    stored = np.array([[0, 849], [1024, 1274]], np.int16)  # HU = stored - 1024: -1024, -175, 0, 250
    path = _dicom(tmp_path / "a" / "ct.dcm", stored)
    x = load_item(path, "image", (2, 2), in_chans=1)
    torch.testing.assert_close(x[0], torch.tensor([[0.0, 0.0], [175 / 425, 1.0]]))


def test_clip_frames_sampled_uniformly(tmp_path: Path) -> None:
    assert frame_indices(10, 4) == [1, 3, 6, 8]
    assert frame_indices(2, 4) == [0, 0, 1, 1]
    assert frame_indices(3, None) == [0, 1, 2]
    folder = tmp_path / "clip"
    for t in range(10):
        _png(folder / f"f{t:02d}.png", np.full((6, 6), t * 20, np.uint8))
    x = load_item(folder, "video", (3, 3), in_chans=3, frames=4)
    assert x.shape == (3, 4, 3, 3)
    torch.testing.assert_close(x[0, :, 1, 1], torch.tensor([20.0, 60.0, 120.0, 160.0]) / 255)
    arr = np.stack([np.full((4, 4, 3), t, np.uint8) for t in range(5)])
    y = load_item(_npy(tmp_path / "c.npy", arr), "video", (4, 4), in_chans=3, frames=5)
    torch.testing.assert_close(y[1, :, 0, 0], torch.arange(5.0) / 255)


def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def test_dataset_normalises_transforms_and_caches(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "x.png", np.full((4, 4), 255, np.uint8))
    _png(tmp_path / "b" / "y.png", np.zeros((4, 4), np.uint8))
    data = read_classification_data(tmp_path)
    calls = []

    def transform(x: torch.Tensor) -> torch.Tensor:
        calls.append(float(x.max()))
        return x * 0.5

    ds = ClassificationDataset(data, size=(2, 2), in_chans=1, transform=transform, cache=True)
    x, label = ds[0]
    assert label == 0 and calls == [1.0]
    torch.testing.assert_close(x, torch.zeros(1, 2, 2))  # normalise(1.0 * 0.5) = 0
    x_again, _ = ds[0]
    torch.testing.assert_close(x_again, x)  # the cached tensor is not changed by the transform
    assert calls == [1.0, 1.0] and ds[1][1] == 1


def test_scale_intensity_rules() -> None:
    hu = torch.tensor([-1000.0, -175.0, 37.5, 250.0, 900.0])
    torch.testing.assert_close(scale_intensity(hu.clone()), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(scale_intensity(torch.tensor([10.0, 20.0]), "ct"), torch.tensor([185 / 425, 195 / 425]))
    with pytest.raises(ValueError):
        scale_intensity(hu, "zscore")


def test_real_ct_slices_load_with_the_hu_window(tmp_path: Path, shared_data: Path) -> None:
    from medvit.pipelines.io import read_scan

    hu = read_scan(shared_data / "ct" / "example_ct_sm.nii.gz").array
    for cls, k in (("upper", 20), ("lower", 5), ("lower", 6)):
        _nifti(tmp_path / cls / f"slice{k}.nii.gz", np.ascontiguousarray(hu[:, :, k]))
    data = read_classification_data(tmp_path)
    assert data.kind == "image" and data.classes == ["lower", "upper"]
    ds = ClassificationDataset(data, size=hu.shape[:2], in_chans=3)
    x, label = ds[2]
    assert label == 1 and x.shape == (3, *hu.shape[:2])
    window = np.clip((hu[:, :, 20].astype(np.float32) - LO) / (HI - LO), 0, 1)
    torch.testing.assert_close(x[1], torch.from_numpy((window - 0.5) / 0.5))
    assert 0 < (window == 0).mean() < 1  # the slice holds air below the window and tissue inside it


def test_real_ct_volume_and_dicom_slice_load_with_the_hu_window(tmp_path: Path, shared_data: Path) -> None:
    import shutil

    import pydicom
    from medvit.pipelines.io import read_scan

    ct = shared_data / "ct" / "example_ct_sm.nii.gz"
    hu = read_scan(ct).array.astype(np.float32)
    x = load_item(ct, "volume", hu.shape, in_chans=1)
    torch.testing.assert_close(x[0], torch.from_numpy(np.clip((hu - LO) / (HI - LO), 0, 1)))
    small = load_item(ct, "volume", (16, 12, 8), in_chans=1)
    assert small.shape == (1, 16, 12, 8) and 0 <= small.min() and small.max() <= 1
    source = min((shared_data / "ct_dicom").iterdir())
    slice_path = shutil.copy(source, tmp_path / "slice.dcm")
    ds = pydicom.dcmread(slice_path)
    hu_slice = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    y = load_item(slice_path, "image", hu_slice.shape, in_chans=1)
    expected = np.clip((hu_slice - LO) / (HI - LO), 0, 1).astype(np.float32)
    torch.testing.assert_close(y[0], torch.from_numpy(expected))


def test_dicom_series_folders_are_volumes(tmp_path: Path, shared_data: Path) -> None:
    from medvit.pipelines.io import read_scan

    series = shared_data / "ct_dicom"
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "series").symlink_to(series, target_is_directory=True)
    data = read_classification_data(tmp_path)
    assert data.kind == "volume" and [i.id for i in data.items] == ["a/series", "b/series"]
    x = ClassificationDataset(data, size=(16, 16, 4), in_chans=1)[1][0]
    assert x.shape == (1, 16, 16, 4)
    hu = read_scan(series).array.astype(np.float32)
    window = torch.from_numpy(np.clip((hu - LO) / (HI - LO), 0, 1))[None]
    torch.testing.assert_close(x, normalise(resize(window, (16, 16, 4))))
