"""DICOM series integrity: a damaged series is refused by name, never stacked into a wrong grid.

The series are the real 20-slice CT of the shared data (JPEG 2000, 2 mm apart), copied and
damaged the way transfers and exports damage them: a slice deleted, duplicated or
truncated, a tag changed in place (same length, so the file stays valid DICOM).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medvit.pipelines.errors import MedvitError, ScanError
from medvit.pipelines.io import find_scans, read_scan

SERIES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct_dicom"
N_SLICES, SPACING = 20, 2.0


@pytest.fixture(scope="module")
def intact() -> np.ndarray:
    if not SERIES.is_dir():
        pytest.skip(f"shared DICOM series not found at {SERIES} (a clone outside the workplace)")
    return read_scan(SERIES).array


@pytest.fixture()
def series(tmp_path: Path, intact: np.ndarray) -> Path:
    folder = tmp_path / "series"
    folder.mkdir()
    for f in sorted(SERIES.iterdir()):
        shutil.copyfile(f, folder / f.name)
    return folder


def _files(folder: Path) -> list[Path]:
    """The slice files in name order, which here is slice order (z from -766.5 down)."""
    return sorted(folder.iterdir())


def _patch(path: Path, group: int, element: int, value: str) -> None:
    """Overwrite an explicit-VR tag value in place; the new value is space-padded to the old length."""
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<HH", group, element), 132)
    assert at > 0, (group, element)
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    raw = value.encode("ascii")
    assert len(raw) <= length, (value, length)
    data[at + 8 : at + 8 + length] = raw.ljust(length, b" ")
    path.write_bytes(bytes(data))


def _refused(folder: Path, *fragments: str) -> str:
    with pytest.raises(ScanError) as exc:
        read_scan(folder)
    message = str(exc.value)
    assert isinstance(exc.value, MedvitError) and "\n" not in message
    assert message.startswith(f"{folder}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_missing_middle_slice_is_refused_naming_its_neighbours(series: Path) -> None:
    files = _files(series)
    files[7].unlink()
    _refused(
        series, "missing slices", "gap of 4 mm", files[6].name, files[8].name, "(InstanceNumber 275 and 273)",
        "about 1 slice(s) absent",
    )


def test_two_missing_slices(series: Path) -> None:
    files = _files(series)
    files[3].unlink()
    files[4].unlink()
    _refused(series, "missing slices", "gap of 6 mm", "about 2 slice(s) absent")


@pytest.mark.parametrize("end", [0, -1])
def test_series_without_an_end_slice_is_a_shorter_correct_volume(series: Path, intact: np.ndarray, end: int) -> None:
    files = _files(series)
    full = read_scan(series)
    files[end].unlink()
    scan = read_scan(series)
    assert scan.shape == (512, 512, N_SLICES - 1)
    assert scan.spacing == pytest.approx((0.9765625, 0.9765625, SPACING))
    kept = slice(0, N_SLICES - 1) if end == 0 else slice(1, N_SLICES)
    # Slices run from the most inferior file (the last name) upwards.
    np.testing.assert_array_equal(scan.array, intact[:, :, kept])
    first_kept_voxel = np.array([0, 0, kept.start, 1.0])
    np.testing.assert_allclose(scan.affine @ [0, 0, 0, 1], full.affine @ first_kept_voxel, atol=1e-4)


def test_duplicated_slice_is_refused(series: Path) -> None:
    files = _files(series)
    shutil.copyfile(files[5], series / "copy_of_slice")
    _refused(series, "duplicated slice position", "copy_of_slice", files[5].name)


@pytest.mark.parametrize("keep", [100, 2000, 0.5, -10])
def test_truncated_slice_is_refused_by_name(series: Path, keep: float) -> None:
    victim = _files(series)[9]
    data = victim.read_bytes()
    victim.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) + keep])
    _refused(series, "damaged or truncated DICOM file", victim.name)


def test_mixed_orientation_is_refused(series: Path) -> None:
    victim = _files(series)[4]
    _patch(victim, 0x0020, 0x0037, "1\\0\\0\\0\\0\\-1")
    _refused(series, "mixed slice orientations", victim.name)


def test_uneven_spacing_is_refused(series: Path) -> None:
    victim = _files(series)[10]  # z = -786.5 between -784.5 and -788.5
    _patch(victim, 0x0020, 0x0032, "-249.51171875\\-437.51171875\\-787.2")
    _refused(series, "uneven slice spacing", "1.3 to 2.7 mm")


def test_gantry_tilt_is_refused(series: Path) -> None:
    for k, f in enumerate(_files(series)):
        _patch(f, 0x0020, 0x0032, f"-249.51171875\\{-437.51171875 + 0.35 * k:.8f}\\{-766.5 - 2 * k}")
    _refused(series, "not stacked along their normal", "0.35 mm sideways")


def test_slice_without_position_is_refused(series: Path) -> None:
    victim = _files(series)[2]
    _patch(victim, 0x0020, 0x0032, "not\\a\\position")
    _refused(series, "without a valid ImagePositionPatient", victim.name)


def test_per_slice_rescale_is_applied_not_truncated(series: Path, intact: np.ndarray) -> None:
    files = _files(series)
    _patch(files[3], 0x0028, 0x1053, "2")
    scan = read_scan(series)
    assert scan.array.dtype == np.float32
    expected = intact.astype(np.float32)
    # GDCM applies each file's own slope: raw = HU + 1024, so HU' = 2 * raw - 1024.
    expected[:, :, N_SLICES - 1 - 3] = 2 * (intact[:, :, N_SLICES - 1 - 3] + 1024.0) - 1024.0
    np.testing.assert_allclose(scan.array, expected)


def test_unrelated_files_beside_the_series_are_ignored(series: Path, intact: np.ndarray) -> None:
    (series / "README.txt").write_text("exported by PACS\n")
    (series / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (series / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    meta = _meta_element(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.88.11\0")  # a structured report
    meta += _meta_element(0x0010, b"UI", b"1.2.840.10008.1.2.1\0")
    dataset = struct.pack("<HH", 0x0008, 0x0016) + b"UI" + struct.pack("<H", 30) + b"1.2.840.10008.5.1.4.1.1.88.11\0"
    (series / "report.dcm").write_bytes(b"\0" * 128 + b"DICM" + meta + dataset)
    scan = read_scan(series)
    assert scan.shape == (512, 512, N_SLICES)
    np.testing.assert_array_equal(scan.array, intact)


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def test_unreadable_file_with_a_dicom_name_is_refused(series: Path) -> None:
    (series / "IM0021.dcm").write_bytes(b"\0" * 64)
    _refused(series, "damaged or truncated DICOM file", "IM0021.dcm")


def test_single_slices_and_multi_frame_files(series: Path, tmp_path: Path) -> None:
    files = _files(series)
    with pytest.raises(ScanError) as exc:
        read_scan(files[0])
    assert str(exc.value) == f"{files[0]}: a single DICOM slice; pass the folder that holds the whole series"
    assert find_scans([files[0]]) == [files[0]]

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copyfile(files[0], lonely / files[0].name)
    _refused(lonely, "a single DICOM slice", files[0].name)

    volume = sitk.Image([16, 12, 5], sitk.sitkUInt16)
    multi = tmp_path / "multi.dcm"
    sitk.WriteImage(volume, str(multi))
    with pytest.raises(ScanError) as exc:
        read_scan(multi)
    assert "a multi-frame DICOM file (5 frames)" in str(exc.value) and str(multi) in str(exc.value)

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("a.dcm", "b.dcm"):
        shutil.copyfile(multi, mixed / name)
    _refused(mixed, "multi-frame DICOM files", "a.dcm")


def test_series_larger_than_memory_is_refused_before_reading(series: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medvit.pipelines import scan_checks

    monkeypatch.setattr(scan_checks, "_memory_bytes", lambda: 8 << 20)
    _refused(series, "header declares (512, 512, 20) voxels of 2-byte voxels (10.0 MiB), more than the 8.0 MiB")


def test_mixed_pixel_spacing_is_refused(series: Path) -> None:
    _patch(_files(series)[12], 0x0028, 0x0030, "0.8765625\\0.8765625")
    _refused(series, "different pixel spacings (PixelSpacing)")


def test_folder_of_other_scans_is_not_a_dicom_series(tmp_path: Path) -> None:
    folder = tmp_path / "niftis"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"x")
    _refused(folder, "no DICOM series found in folder")
