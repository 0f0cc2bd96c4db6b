"""Tests for scan reading and mask writing: geometry round trips, reader parity, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medvit.pipelines import io as scan_io
from medvit.pipelines.errors import MedvitError, ScanError
from medvit.pipelines.io import Scan, find_scans, is_dicom_folder, read_scan, write_mask

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
SHAPE = (12, 10, 8)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
FORMATS = ["nii.gz", "nii", "nrrd", "mha"]
DTYPES = [np.int16, np.int32, np.float32, np.uint8, np.float64, np.int16]


def _rotation(rng: np.random.Generator, proper: bool | None = None) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if proper is not None and (np.linalg.det(q) > 0) != proper:
        q[:, 2] *= -1
    return q


def _direction(rng: np.random.Generator, seed: int) -> np.ndarray:
    """ITK (LPS) direction: identity (LPS), RAS, an axis permutation, or oblique of either handedness."""
    kind = seed % 4
    if kind == 0:
        return np.eye(3)
    if kind == 1:
        return np.diag([-1.0, -1.0, 1.0])
    if kind == 2:
        return np.eye(3)[:, [2, 0, 1]] * np.array([1.0, -1.0, 1.0])
    return _rotation(rng, proper=seed % 8 == 3)


def _random_grid(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Direction (LPS), anisotropic spacing, origin, and a voxel array of a varying dtype."""
    rng = np.random.default_rng(seed)
    direction = _direction(rng, seed)
    spacing = rng.uniform(0.3, 4.0, size=3)
    origin = rng.uniform(-300.0, 300.0, size=3)
    dtype = np.dtype(DTYPES[seed % len(DTYPES)])
    if dtype.kind == "f":
        array = (rng.normal(size=SHAPE) * 500).astype(dtype)
    else:
        array = rng.integers(0, min(np.iinfo(dtype).max, 2000), size=SHAPE).astype(dtype)
    return direction, spacing, origin, array


def _lps_affine(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = origin
    return affine


def _itk_image(array: np.ndarray, direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(origin.tolist())
    return image


def _write_scan(folder: Path, fmt: str, seed: int) -> tuple[Path, np.ndarray, np.ndarray]:
    """Write a random scan; return its path, voxels and expected RAS affine."""
    direction, spacing, origin, array = _random_grid(seed)
    ras = LPS_TO_RAS @ _lps_affine(direction, spacing, origin)
    path = folder / f"scan{seed}.{fmt}"
    if fmt.startswith("nii"):
        img = nib.Nifti1Image(array, ras)
        img.header.set_qform(ras, code=1)
        img.header.set_sform(ras, code=1)
        nib.save(img, str(path))
    else:
        sitk.WriteImage(_itk_image(array, direction, spacing, origin), str(path))
    return path, array, ras


def _write_dicom_series(
    folder: Path,
    array: np.ndarray,
    direction: np.ndarray,
    spacing: np.ndarray,
    origin: np.ndarray,
    series: str,
    extra_tags: dict[str, str] | None = None,
) -> None:
    """One extension-less file per slice, named so that name order is not slice order."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = _itk_image(array, direction, spacing, origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    uid = "1.2.826.0.1.3680043.2.1125.9"
    cosines = list(direction[:, 0]) + list(direction[:, 1])
    order = np.random.default_rng(len(series)).permutation(array.shape[2])
    for k in range(array.shape[2]):
        sl = volume[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2.{series}",
            "0008|0018": f"{uid}.3.{series}.{k}",
            "0020|0037": "\\".join(f"{v:.10f}" for v in cosines),
            "0020|0032": "\\".join(f"{v:.10f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1),
            **(extra_tags or {}),
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{series}{order[k]:04d}"))
        writer.Execute(sl)


def _check_error(exc: pytest.ExceptionInfo[ScanError], path: Path, problem: str) -> None:
    assert isinstance(exc.value, MedvitError) and isinstance(exc.value, ValueError)
    message = str(exc.value)
    assert "\n" not in message
    assert str(path) in message
    assert problem in message


def _monai_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from monai.transforms import LoadImage

    image = LoadImage(reader="ITKReader", image_only=True)(str(path))
    return np.asarray(image), np.asarray(image.affine, dtype=np.float64)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("seed", range(8))
def test_round_trip_geometry(tmp_path: Path, fmt: str, seed: int) -> None:
    path, array, ras = _write_scan(tmp_path, fmt, seed)
    scan = read_scan(path)
    assert scan.shape == SHAPE
    assert scan.array.dtype == array.dtype
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.affine, ras, atol=1e-4)
    assert scan.affine.dtype == np.float64 and scan.affine.shape == (4, 4)
    np.testing.assert_allclose(scan.spacing, np.linalg.norm(ras[:3, :3], axis=0), rtol=1e-5)
    assert scan.orientation() == "".join(nib.aff2axcodes(ras))

    labels = np.random.default_rng(100 + seed).integers(0, 6, size=SHAPE)
    out = write_mask(labels, scan, tmp_path / "out" / f"mask{seed}.nii.gz")
    assert out == tmp_path / "out" / f"mask{seed}.nii.gz"
    back = nib.load(out)
    assert back.shape == SHAPE
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)

    itk_in, itk_out = sitk.ReadImage(str(path)), sitk.ReadImage(str(out))
    np.testing.assert_allclose(itk_out.GetOrigin(), itk_in.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(itk_out.GetSpacing(), itk_in.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(itk_out.GetDirection(), itk_in.GetDirection(), atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.mark.parametrize("fmt", ["nrrd", "mha", "nii.gz"])
@pytest.mark.parametrize("seed", [2, 3, 7])  # permuted axes, oblique right- and left-handed
def test_matches_monai_itk_reader(tmp_path: Path, fmt: str, seed: int) -> None:
    path, _, _ = _write_scan(tmp_path, fmt, seed)
    scan = read_scan(path)
    monai_array, monai_affine = _monai_itk(path)
    np.testing.assert_allclose(scan.affine, monai_affine, atol=1e-4)
    np.testing.assert_array_equal(scan.array, monai_array)


@pytest.mark.parametrize("seed", [1, 3, 7])
def test_nifti_matches_nibabel(tmp_path: Path, seed: int) -> None:
    path, _, _ = _write_scan(tmp_path, "nii.gz", seed)
    scan = read_scan(path)
    reference = nib.load(path)
    np.testing.assert_array_equal(scan.affine, reference.affine)
    np.testing.assert_array_equal(scan.array, np.asarray(reference.dataobj))


def test_nifti_mask_header_geometry_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    sform = np.eye(4)
    sform[:3, :3] = _rotation(rng) * [0.8, 1.2, 3.0]
    sform[:3, 3] = [12.5, -40.0, 7.25]
    qform = np.diag([0.8, 1.2, 3.0, 1.0])
    img = nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), sform)
    img.header.set_qform(qform, code=1)
    img.header.set_sform(sform, code=4)
    img.header["cal_max"] = 400.0
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)

    out = write_mask(np.ones(SHAPE, np.uint8), read_scan(path), tmp_path / "ct_mask.nii.gz")
    src, dst = nib.load(path).header, nib.load(out).header
    for name in scan_io._NIFTI_GEOMETRY_FIELDS:
        np.testing.assert_array_equal(dst[name], src[name], err_msg=name)
    assert dst.get_data_dtype() == np.uint8
    assert (nib.load(out).dataobj.slope, nib.load(out).dataobj.inter) == (1.0, 0.0)
    assert float(dst["cal_max"]) == 0.0
    np.testing.assert_array_equal(nib.load(out).get_qform(), nib.load(path).get_qform())
    # ITK prefers a scanner qform over an MNI sform (nibabel the opposite): both must agree with the input.
    itk_in, itk_out = sitk.ReadImage(str(path)), sitk.ReadImage(str(out))
    np.testing.assert_allclose(itk_out.GetDirection(), itk_in.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(itk_out.GetOrigin(), itk_in.GetOrigin(), atol=1e-6)


@pytest.mark.parametrize("fmt", ["nii.gz", "nrrd"])
def test_uint16_for_more_than_255_labels(tmp_path: Path, fmt: str) -> None:
    path, _, ras = _write_scan(tmp_path, fmt, seed=3)
    labels = np.random.default_rng(0).integers(0, 300, size=SHAPE)
    labels[0, 0, 0] = 300
    out = write_mask(labels, read_scan(path), tmp_path / "mask.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)
    np.testing.assert_allclose(back.affine, ras, atol=1e-4)
    low = write_mask(labels.clip(0, 255).astype(np.int64), read_scan(path), tmp_path / "low.nii.gz")
    assert nib.load(low).get_data_dtype() == np.uint8


def test_scaled_nifti_is_float_unscaled_keeps_ints(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).integers(0, 100, size=SHAPE).astype(np.int16)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "scaled.nii")
    scan = read_scan(tmp_path / "scaled.nii")
    assert scan.array.dtype == np.float32
    np.testing.assert_array_equal(scan.array, raw * 2.0 - 1024.0)

    nib.save(nib.Nifti1Image(raw.astype(np.int32), np.eye(4)), tmp_path / "plain.nii")
    assert read_scan(tmp_path / "plain.nii").array.dtype == np.int32


def test_big_endian_nifti_becomes_native(tmp_path: Path) -> None:
    raw = np.arange(np.prod(SHAPE), dtype=">i2").reshape(SHAPE)
    nib.save(nib.Nifti1Image(raw, np.eye(4)), tmp_path / "be.nii")
    scan = read_scan(tmp_path / "be.nii")
    assert scan.array.dtype.isnative and scan.array.dtype == np.int16
    np.testing.assert_array_equal(scan.array, raw)


def test_trailing_singleton_4th_dim_is_squeezed(tmp_path: Path) -> None:
    array = np.random.default_rng(0).normal(size=(*SHAPE, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "t.nii.gz")
    scan = read_scan(tmp_path / "t.nii.gz")
    assert scan.shape == SHAPE
    np.testing.assert_array_equal(scan.array, array[..., 0])

    image = sitk.JoinSeries(_itk_image(array[..., 0], np.eye(3), np.array([0.5, 0.7, 2.0]), np.array([1.0, 2.0, 3.0])))
    sitk.WriteImage(image, str(tmp_path / "t.mha"))
    scan = read_scan(tmp_path / "t.mha")
    assert scan.shape == SHAPE and scan.spacing == pytest.approx((0.5, 0.7, 2.0))
    out = write_mask(np.zeros(SHAPE, np.uint8), scan, tmp_path / "m.nii.gz")
    np.testing.assert_allclose(nib.load(out).affine, scan.affine, atol=1e-5)


def test_scan_properties() -> None:
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    scan = Scan(array=np.zeros(SHAPE, np.int16), affine=affine, path=Path("/data/case_01.nii.gz"))
    assert scan.shape == SHAPE and scan.spacing == (0.5, 0.5, 2.0)
    assert scan.orientation() == "LPS" and scan.stem == "case_01"
    stems = {"a.nii": "a", "b.nrrd": "b", "c.NHDR": "c", "d.mha": "d", "e.mhd": "e", "f.dcm": "f", "ser_3": "ser_3"}
    for name, stem in stems.items():
        assert Scan(np.zeros(SHAPE), affine, Path(name)).stem == stem


def test_write_mask_for_scan_built_in_code(tmp_path: Path) -> None:
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    affine[:3, 3] = [10, 20, 30]
    scan = Scan(array=np.zeros(SHAPE, np.int16), affine=affine, path=Path("x.nii.gz"))
    out = write_mask(np.ones(SHAPE, bool), scan, tmp_path / "x_mask.nii.gz")
    np.testing.assert_allclose(nib.load(out).affine, affine)
    assert np.asarray(nib.load(out).dataobj).sum() == np.prod(SHAPE)


def test_synthetic_oblique_dicom_series(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    direction, spacing, origin = _rotation(rng, proper=True), np.array([0.7, 0.9, 2.5]), np.array([10.0, -20.0, 30.0])
    array = rng.integers(-1000, 1000, size=SHAPE).astype(np.int16)
    folder = tmp_path / "series"
    _write_dicom_series(folder, array, direction, spacing, origin, series="1")
    # A localizer series beside it is not a candidate volume and is ignored.
    localizer = {"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"}
    _write_dicom_series(folder, array[:, :, :3], direction, spacing, origin + 100.0, series="22", extra_tags=localizer)

    assert is_dicom_folder(folder)
    scan = read_scan(folder)
    assert scan.stem == "series" and scan.shape == SHAPE and scan.array.dtype == np.int16
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.affine, LPS_TO_RAS @ _lps_affine(direction, spacing, origin), atol=1e-4)
    out = write_mask((array > 0).astype(np.uint8), scan, tmp_path / "series_mask.nii.gz")
    back = sitk.ReadImage(str(out))
    np.testing.assert_allclose(back.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), direction.ravel(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).transpose(2, 1, 0), array > 0)

    # A second image series is not guessed away: the folder is refused, naming both.
    _write_dicom_series(folder, array[:, :, :3], direction, spacing, origin + 100.0, series="333")
    with pytest.raises(ScanError) as exc:
        read_scan(folder)
    _check_error(exc, folder, "holds 2 DICOM image series")
    assert "8 files" in str(exc.value) and "3 files" in str(exc.value)


def test_real_dicom_series(tmp_path: Path) -> None:
    folder = SHARED_DATA / "ct_dicom"
    if not folder.is_dir():
        pytest.skip(f"shared DICOM series not found at {folder} (a clone outside the workplace)")
    assert is_dicom_folder(folder)
    assert find_scans([folder]) == [folder]
    scan = read_scan(folder)
    assert scan.shape == (512, 512, 20)
    assert scan.spacing == pytest.approx((0.977, 0.977, 2.0), abs=1e-3)
    assert scan.stem == "ct_dicom" and scan.array.dtype.kind == "i"
    monai_array, monai_affine = _monai_itk(folder)
    np.testing.assert_allclose(scan.affine, monai_affine, atol=1e-4)
    np.testing.assert_array_equal(scan.array, monai_array)

    out = write_mask((scan.array > 0).astype(np.uint8), scan, tmp_path / "ct_dicom_mask.nii.gz")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    series, back = reader.Execute(), sitk.ReadImage(str(out))
    assert back.GetSize() == series.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), series.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), series.GetDirection(), atol=1e-6)


def test_real_nifti_ct(tmp_path: Path) -> None:
    path = SHARED_DATA / "ct" / "example_ct.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared CT not found at {path} (a clone outside the workplace)")
    scan = read_scan(path)
    reference = nib.load(path)
    assert scan.shape == (122, 101, 112) and scan.array.dtype == np.int32
    assert scan.spacing == pytest.approx((3.0, 3.0, 3.0)) and scan.orientation() == "RAS"
    assert scan.stem == "example_ct"
    np.testing.assert_array_equal(scan.affine, reference.affine)
    labels = (scan.array > 200).astype(np.uint8)
    out = write_mask(labels, scan, tmp_path / "example_ct_mask.nii.gz")
    back = nib.load(out)
    np.testing.assert_array_equal(back.affine, reference.affine)
    assert back.header["sform_code"] == reference.header["sform_code"]
    assert back.header["qform_code"] == reference.header["qform_code"]
    np.testing.assert_array_equal(np.asarray(back.dataobj), labels)


def _fake_dicom(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)


def test_find_scans_expands_folders(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name in ["b.nii.gz", "a.nrrd", "c.mha", "d.nii", "e.mhd", "f.nhdr"]:
        (data / name).write_bytes(b"x")
    (data / "notes.txt").write_text("not a scan")
    (data / "e.raw").write_bytes(b"x")
    (data / ".tmp-1234-z.nii.gz").write_bytes(b"partial")
    _fake_dicom(data / "series1" / "IM0001")
    (data / "other").mkdir()
    (data / "other" / "x.txt").write_text("x")
    single = tmp_path / "single.nii.gz"
    single.write_bytes(b"x")

    found = find_scans([data, single, str(data / "b.nii.gz"), data / "series1"])
    names = ["a.nrrd", "b.nii.gz", "c.mha", "d.nii", "e.mhd", "f.nhdr", "series1"]
    assert found == [data / n for n in names] + [single]


def test_is_dicom_folder(tmp_path: Path) -> None:
    _fake_dicom(tmp_path / "dcm" / "1.2.3")
    (tmp_path / "nifti").mkdir()
    (tmp_path / "nifti" / "a.nii.gz").write_bytes(b"\0" * 200)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a").write_text("x" * 300)
    assert is_dicom_folder(tmp_path / "dcm")
    assert not is_dicom_folder(tmp_path / "nifti")
    assert not is_dicom_folder(tmp_path / "text")
    assert not is_dicom_folder(tmp_path / "dcm" / "1.2.3")
    assert not is_dicom_folder(tmp_path / "missing")


def test_find_scans_errors(tmp_path: Path) -> None:
    with pytest.raises(ScanError) as exc:
        find_scans([tmp_path / "missing"])
    _check_error(exc, tmp_path / "missing", "no such file or folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError) as exc:
        find_scans([tmp_path / "empty"])
    _check_error(exc, tmp_path / "empty", "folder is empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "readme.txt").write_text("hello")
    with pytest.raises(ScanError) as exc:
        find_scans([tmp_path / "txt"])
    _check_error(exc, tmp_path / "txt", "no scans found")
    with pytest.raises(ScanError) as exc:
        find_scans([tmp_path / "txt" / "readme.txt"])
    _check_error(exc, tmp_path / "txt" / "readme.txt", "not a supported scan file")


def _bad_files(folder: Path) -> list[tuple[Path, str]]:
    """(path, expected problem) for every kind of unreadable scan file."""
    cases: list[tuple[Path, str]] = []
    empty = folder / "empty.nii.gz"
    empty.write_bytes(b"")
    cases.append((empty, "file is empty"))

    good, _, _ = _write_scan(folder, "nii.gz", seed=2)
    data = good.read_bytes()
    cut = folder / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    cases.append((cut, "truncated or damaged gzip data"))
    raw_nii = folder / "cut.nii"
    raw_nii.write_bytes(gzip.decompress(data)[:600])
    cases.append((raw_nii, "truncated: the header declares"))
    for fmt in ["nrrd", "mha"]:
        good, _, _ = _write_scan(folder, fmt, seed=2)
        cut = folder / f"cut.{fmt}"
        cut.write_bytes(good.read_bytes()[:-300])
        cases.append((cut, "truncated: the header declares"))

    for name in ["text.nii.gz", "text.nii", "text.nrrd", "text.mha"]:
        (folder / name).write_text("this is not an image\n" * 20)
        cases.append((folder / name, "not a readable"))
    (folder / "scan.png").write_bytes(b"\x89PNG" + b"\0" * 200)
    cases.append((folder / "scan.png", "not a supported scan file"))

    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 3), np.float32), np.eye(4)), folder / "four.nii.gz")
    cases.append((folder / "four.nii.gz", "expected a 3D image, got shape (12, 10, 8, 3)"))
    nib.save(nib.Nifti1Image(np.zeros((12, 10), np.float32), np.eye(4)), folder / "flat.nii.gz")
    cases.append((folder / "flat.nii.gz", "expected a 3D image, got shape (12, 10)"))
    sitk.WriteImage(sitk.Image([12, 10], sitk.sitkInt16), str(folder / "flat.mha"))
    cases.append((folder / "flat.mha", "expected a 3D image, got shape (12, 10)"))
    sitk.WriteImage(sitk.Image([12, 10, 8], sitk.sitkVectorFloat32, 3), str(folder / "rgb.nrrd"))
    cases.append((folder / "rgb.nrrd", "3 components per voxel"))

    nan = np.zeros(SHAPE, np.float32)
    nan[0, 0, :3] = np.nan
    nan[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), folder / "nan.nii.gz")
    cases.append((folder / "nan.nii.gz", "contains 4 NaN/infinite voxels"))
    sitk.WriteImage(_itk_image(nan, np.eye(3), np.ones(3), np.zeros(3)), str(folder / "nan.nrrd"))
    cases.append((folder / "nan.nrrd", "contains 4 NaN/infinite voxels"))

    (folder / "missing_raw.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 12 10 8\n"
                                            "ElementType = MET_SHORT\nElementDataFile = gone.raw\n")
    cases.append((folder / "missing_raw.mhd", "its data file gone.raw is missing"))
    cases.append((folder / "missing.nii.gz", "no such file or folder"))

    (folder / "empty_dir").mkdir()
    cases.append((folder / "empty_dir", "folder is empty"))
    (folder / "no_series").mkdir()
    (folder / "no_series" / "notes.txt").write_text("hello")
    cases.append((folder / "no_series", "no DICOM series found"))
    return cases


def test_read_scan_bad_input(tmp_path: Path) -> None:
    for path, problem in _bad_files(tmp_path):
        with pytest.raises(ScanError) as exc:
            read_scan(path)
        _check_error(exc, path, problem)


def _scan(tmp_path: Path, fmt: str = "nii.gz") -> Scan:
    path, _, _ = _write_scan(tmp_path, fmt, seed=3)
    return read_scan(path)


@pytest.mark.parametrize(
    ("mask", "problem"),
    [
        (np.zeros((12, 10, 7), np.uint8), "does not match the shape (12, 10, 8)"),
        (np.zeros(SHAPE, np.float32), "integer labels"),
        (np.full(SHAPE, -1, np.int16), "negative label -1"),
        (np.full(SHAPE, 70000, np.int32), "does not fit in uint16"),
    ],
)
def test_write_mask_bad_mask_leaves_nothing(tmp_path: Path, mask: np.ndarray, problem: str) -> None:
    scan = _scan(tmp_path)
    out = tmp_path / "out" / "mask.nii.gz"
    with pytest.raises(ScanError) as exc:
        write_mask(mask, scan, out)
    _check_error(exc, out, problem)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_write_mask_bad_name(tmp_path: Path) -> None:
    scan = _scan(tmp_path)
    for out in [tmp_path / "mask.nrrd", tmp_path / ".nii.gz"]:
        with pytest.raises(ScanError) as exc:
            write_mask(np.zeros(SHAPE, np.uint8), scan, out)
        _check_error(exc, out, "must end in .nii.gz")
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(ScanError) as exc:
        write_mask(np.zeros(SHAPE, np.uint8), scan, tmp_path / "dir.nii.gz")
    _check_error(exc, tmp_path / "dir.nii.gz", "output path is a folder")


@pytest.mark.parametrize(
    ("fmt", "failure", "raised"),
    [("nii.gz", OSError("No space left on device"), ScanError), ("nrrd", OSError("No space left on device"), ScanError),
     ("nii.gz", KeyboardInterrupt(), KeyboardInterrupt)],
)  # fmt: skip
def test_write_failure_keeps_old_output_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, failure: BaseException, raised: type
) -> None:
    scan = _scan(tmp_path, fmt)
    out = tmp_path / "out" / "mask.nii.gz"
    out.parent.mkdir()
    out.write_bytes(b"previous result")

    def broken_write(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"half a file")
        raise failure

    monkeypatch.setattr(scan_io.nib, "save", broken_write)
    monkeypatch.setattr(sitk, "WriteImage", broken_write)  # io imports it where it writes
    with pytest.raises(raised) as exc:
        write_mask(np.zeros(SHAPE, np.uint8), scan, out)
    if raised is ScanError:
        _check_error(exc, out, "No space left on device")
    assert sorted(p.name for p in out.parent.iterdir()) == ["mask.nii.gz"]
    assert out.read_bytes() == b"previous result"
