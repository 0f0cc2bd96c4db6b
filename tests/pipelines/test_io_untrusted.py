"""Scan files whose headers cannot be trusted: refused with the file and the reason, or read on the right grid.

NIfTI files are written byte by byte from a header edited without nibabel's repairs, so
each case is exactly the damage named; NRRD and MetaImage headers are written as text.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvit.pipelines import scan_checks
from medvit.pipelines.errors import MedvitError, ScanError
from medvit.pipelines.io import read_scan

SHAPE = (6, 5, 4)
AFFINE = np.array([[-0.8, 0.0, 0.0, 40.0], [0.0, 0.9, 0.0, -20.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _nifti(
    path: Path,
    fields: dict[str, object] | None = None,
    shape: tuple[int, ...] = SHAPE,
    dtype: type = np.int16,
    data: bytes | None = None,
    nifti2: bool = False,
    compress: bool | None = None,
) -> np.ndarray:
    """Write a single-file NIfTI whose header is edited raw; return the voxels written."""
    array = (np.arange(int(np.prod(shape))) % 97).reshape(shape).astype(dtype)
    image = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(array, AFFINE)
    image.header.set_qform(AFFINE, code=1)
    image.header.set_sform(AFFINE, code=1)
    header = type(image.header)(image.header.binaryblock, check=False)
    header["vox_offset"] = header.single_vox_offset
    for key, value in (fields or {}).items():
        header[key] = value
    blob = header.binaryblock + b"\0" * 4 + (array.tobytes(order="F") if data is None else data)
    gz = path.name.endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return array


def _refused(path: Path, fragment: str) -> str:
    with pytest.raises(ScanError) as exc:
        read_scan(path)
    message = str(exc.value)
    assert isinstance(exc.value, MedvitError) and "\n" not in message
    assert message.startswith(f"{path}: "), message
    assert fragment in message, (fragment, message)
    return message


def _with_dim(shape: tuple[int, ...]) -> dict[str, object]:
    return {"dim": [len(shape), *shape, *[1] * (7 - len(shape))]}


SINGULAR = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])

NIFTI_REFUSED = {
    "sform_nan": ({"srow_x": [np.nan, 0, 0, 0]}, "the sform holds NaN or infinite values"),
    "sform_inf_origin": ({"srow_y": [0, 1, 0, np.inf]}, "the sform holds NaN or infinite values"),
    "sform_zero_axis": ({"srow_x": [0, 0, 0, 0], "srow_y": [0, 0, 0, 0], "srow_z": [0, 0, 0, 0]}, "the sform is singular"),
    "sform_parallel": (
        {"srow_x": SINGULAR[0], "srow_y": SINGULAR[1], "srow_z": SINGULAR[2]}, "two voxel axes point the same way"
    ),
    "sform_tiny": ({"srow_x": [1e-9, 0, 0, 0]}, "implausible voxel sizes"),
    "qform_not_rotation": ({"sform_code": 0, "quatern_b": 0.9, "quatern_c": 0.9}, "the qform quaternion is not a rotation"),
    "qform_nan": ({"sform_code": 0, "qoffset_x": np.nan}, "the qform holds NaN or infinite values"),
    "qform_bad_qfac": ({"sform_code": 0, "pixdim": [0.5, 0.8, 0.9, 2.5, 1, 1, 1, 1]}, "invalid qfac"),
    "bad_qform_beside_good_sform": ({"quatern_b": np.nan}, "the qform holds NaN"),
    "no_orientation": ({"sform_code": 0, "qform_code": 0}, "no patient orientation (qform_code and sform_code are both 0)"),
    "unknown_xform_code": ({"sform_code": 7}, "invalid sform_code 7"),
    "pixdim_zero": ({"pixdim": [1, 0.8, 0.0, 2.5, 1, 1, 1, 1]}, "invalid voxel size (pixdim) (0.8, 0, 2.5)"),
    "pixdim_negative": ({"pixdim": [1, -0.8, 0.9, 2.5, 1, 1, 1, 1]}, "invalid voxel size (pixdim)"),
    "pixdim_nan": ({"pixdim": [1, 0.8, np.nan, 2.5, 1, 1, 1, 1]}, "invalid voxel size (pixdim)"),
    "pixdim_huge": ({"pixdim": [1, 0.8, 0.9, 1e9, 1, 1, 1, 1]}, "implausible voxel size (pixdim)"),
    "units_meters": ({"xyzt_units": 1}, "spatial unit is meters"),
    "units_microns": ({"xyzt_units": 3 | 8}, "spatial unit is micrometres"),
    "intent_vector": ({"intent_code": 1007}, "holds vector data (intent_code 1007)"),
    "intent_cifti": ({"intent_code": 3001}, "intent_code 3001"),
    "dim0_zero": ({"dim": [0, 6, 5, 4, 1, 1, 1, 1]}, "invalid dim[0] = 0"),
    "dim0_eight": ({"dim": [8, 6, 5, 4, 1, 1, 1, 1]}, "invalid dim[0] = 8"),
    "empty_axis": (_with_dim((6, 0, 4)), "has no voxels (shape (6, 0, 4))"),
    "negative_axis": (_with_dim((6, -5, 4)), "has no voxels"),
    "two_d": (_with_dim((6, 5)), "expected a 3D image, got shape (6, 5) (a 2D image)"),
    "volumes": (_with_dim((6, 5, 2, 2)), "(2 volumes or components per voxel)"),
    "vector_5d": (_with_dim((6, 5, 4, 1, 3)), "got shape (6, 5, 4, 1, 3)"),
    "implausible_shape": (_with_dim((32767, 32767, 32767)), "implausible size (32767, 32767, 32767)"),
    "header_bigger_than_file": (_with_dim((60, 50, 40)), "truncated: the header declares 240,352 bytes"),
    "complex": ({"datatype": 32, "bitpix": 64}, "unsupported voxel type complex64 (datatype 32)"),
    "rgb": ({"datatype": 128, "bitpix": 24}, "unsupported voxel type RGB (datatype 128)"),
    "rgba": ({"datatype": 2304, "bitpix": 32}, "unsupported voxel type RGBA (datatype 2304)"),
    "float128": ({"datatype": 1536, "bitpix": 128}, "unsupported voxel type"),
    "binary": ({"datatype": 1, "bitpix": 1}, "unsupported voxel type binary (datatype 1)"),
    "unknown_dtype": ({"datatype": 9999}, "unsupported voxel type code 9999"),
    "slope_nan_intercept": ({"scl_slope": 2.0, "scl_inter": np.nan}, "invalid intensity scaling"),
    "vox_offset_zero": ({"vox_offset": 0}, "invalid voxel data offset (vox_offset = 0; at least 352"),
    "vox_offset_nan": ({"vox_offset": np.nan}, "invalid voxel data offset"),
    "vox_offset_past_end": ({"vox_offset": 100000}, "truncated: the header declares"),
    "pair_magic": ({"magic": b"ni1"}, "a NIfTI header/image pair (magic ni1)"),
    "analyze_magic": ({"magic": b""}, "not a single-file NIfTI"),
}


@pytest.mark.parametrize("case", sorted(NIFTI_REFUSED))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_header_that_cannot_be_trusted_is_refused(tmp_path: Path, case: str, suffix: str) -> None:
    fields, fragment = NIFTI_REFUSED[case]
    path = tmp_path / f"{case}{suffix}"
    _nifti(path, fields)
    _refused(path, fragment)


def test_huge_nifti2_header_in_a_small_gzip_is_refused_without_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge.nii.gz"
    _nifti(path, _with_dim((100000, 100000, 100000)), nifti2=True)
    _refused(path, "implausible size (100000, 100000, 100000)")
    # Plausible by count, impossible by compression: ~1 GB claimed from a few hundred bytes.
    path = tmp_path / "bomb.nii.gz"
    _nifti(path, {**_with_dim((1000, 1000, 1000)), "datatype": 2, "bitpix": 8})
    _refused(path, "cannot hold the 1,000,000,352 bytes the header declares")


def test_nifti_larger_than_memory_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_checks, "_memory_bytes", lambda: 1 << 20)
    path = tmp_path / "big.nii.gz"
    _nifti(path, shape=(64, 64, 64), dtype=np.float64)
    _refused(path, "header declares (64, 64, 64) voxels of float64 (2.0 MiB), more than the 1.0 MiB of memory")
    # Intensity scaling reads the int16 voxels and a float32 copy: 6 bytes a voxel.
    path = tmp_path / "scaled.nii"
    _nifti(path, {"scl_slope": 2.0, "scl_inter": 0.0}, shape=(64, 64, 48))
    _refused(path, "(1.1 MiB), more than the 1.0 MiB")


def test_truncated_gzip_and_damaged_gzip(tmp_path: Path) -> None:
    path = tmp_path / "cut.nii.gz"
    _nifti(path, shape=(40, 40, 30))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    _refused(path, "truncated or damaged gzip data before the 96,352 bytes the header declares")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ScanError) as exc:
        read_scan(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_multi_member_gzip_and_trailing_bytes_are_read(tmp_path: Path) -> None:
    """A gzip trailer that does not give the size is not an error: the stream is counted."""
    plain = tmp_path / "plain.nii"
    array = _nifti(plain)
    blob = plain.read_bytes()
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(blob[:500]) + gzip.compress(blob[500:]))
    extra = tmp_path / "extra.nii.gz"
    extra.write_bytes(gzip.compress(blob + b"\0" * 1000))
    for path in (multi, extra):
        scan = read_scan(path)
        np.testing.assert_array_equal(scan.array, array)
        np.testing.assert_allclose(scan.affine, AFFINE, atol=1e-6)


def test_compression_that_does_not_match_the_name(tmp_path: Path) -> None:
    _nifti(tmp_path / "plain.nii.gz", compress=False)
    _refused(tmp_path / "plain.nii.gz", "named .nii.gz but not gzip-compressed")
    _nifti(tmp_path / "packed.nii", compress=True)
    _refused(tmp_path / "packed.nii", "gzip-compressed but named .nii")
    (tmp_path / "noise.nii").write_bytes(os.urandom(2000))
    _refused(tmp_path / "noise.nii", "not a readable NIfTI file")
    (tmp_path / "zlib.nii.gz").write_bytes(b"\x1f\x8b" + zlib.compress(b"x" * 1000))
    _refused(tmp_path / "zlib.nii.gz", "not a readable NIfTI file")


@pytest.mark.parametrize(
    ("fields", "shape", "expected_shape"),
    [
        ({"scl_slope": 0.0, "scl_inter": 5.0}, SHAPE, SHAPE),  # slope 0: no scaling (NIfTI standard)
        ({"scl_slope": np.nan}, SHAPE, SHAPE),
        ({"scl_slope": np.inf}, SHAPE, SHAPE),
        ({}, (6, 5, 4, 1), SHAPE),
        ({}, (6, 5, 4, 1, 1), SHAPE),
        ({}, (6, 5, 1), (6, 5, 1)),  # one slice is a 3D volume
        ({"sform_code": 0}, SHAPE, SHAPE),  # the qform alone
        ({"qform_code": 0}, SHAPE, SHAPE),  # the sform alone
        ({"intent_code": 1002}, SHAPE, SHAPE),  # a label map is a scalar image
        ({"xyzt_units": 2 | 8}, SHAPE, SHAPE),  # mm and s
    ],
)
def test_trustworthy_variants_are_read_on_the_header_grid(
    tmp_path: Path, fields: dict[str, object], shape: tuple[int, ...], expected_shape: tuple[int, ...]
) -> None:
    path = tmp_path / "ok.nii.gz"
    array = _nifti(path, fields, shape=shape)
    scan = read_scan(path)
    assert scan.shape == expected_shape and scan.array.dtype == np.int16
    np.testing.assert_array_equal(scan.array, array.reshape(expected_shape))
    np.testing.assert_allclose(scan.affine, AFFINE, atol=1e-5)


def test_sheared_sform_and_nifti2_are_read_as_declared(tmp_path: Path) -> None:
    sheared = AFFINE.copy()
    sheared[0, 1] = 0.3
    path = tmp_path / "sheared.nii"
    _nifti(path, {"qform_code": 0, "srow_x": sheared[0], "srow_y": sheared[1], "srow_z": sheared[2]})
    np.testing.assert_allclose(read_scan(path).affine, sheared, atol=1e-6)
    path = tmp_path / "two.nii.gz"
    array = _nifti(path, nifti2=True, dtype=np.float32)
    scan = read_scan(path)
    np.testing.assert_array_equal(scan.array, array)
    np.testing.assert_allclose(scan.affine, AFFINE, atol=1e-6)


def test_paths_that_are_not_files(tmp_path: Path) -> None:
    (tmp_path / "dir.nii.gz").mkdir()
    _refused(tmp_path / "dir.nii.gz", "is a folder, not a scan file")
    fifo = tmp_path / "pipe.nii"
    os.mkfifo(fifo)
    _refused(fifo, "not a regular file")
    _refused(tmp_path / "missing.nii.gz", "no such file or folder")
    (tmp_path / "empty.nrrd").write_bytes(b"")
    _refused(tmp_path / "empty.nrrd", "file is empty")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "locked.nii.gz"
    _nifti(path)
    path.chmod(0)
    _refused(path, "cannot read (Permission denied)")


def _metaimage(path: Path, fields: list[str], dims: str = "4 3 2", ndims: int = 3, data: bytes | None = None,
               element: str = "MET_SHORT") -> None:  # fmt: skip
    count = int(np.prod([int(d) for d in dims.split()]))
    body = np.arange(min(count, 10**6), dtype=np.int16).tobytes() if data is None else data
    text = ["ObjectType = Image", f"NDims = {ndims}", f"DimSize = {dims}", f"ElementType = {element}", *fields,
            "ElementDataFile = LOCAL"]  # fmt: skip
    path.write_bytes(("\n".join(text) + "\n").encode() + body)


def _nrrd(path: Path, fields: list[str], data: bytes) -> None:
    path.write_bytes(("NRRD0004\n" + "\n".join(fields) + "\n\n").encode() + data)


NRRD_BASE = ["type: short", "dimension: 3", "encoding: raw", "endian: little", "sizes: 4 3 2",
             "space: left-posterior-superior"]  # fmt: skip
ZEROS = np.zeros(24, np.int16).tobytes()
ITK_REFUSED = {
    "spacing_zero.mha": (lambda p: _metaimage(p, ["ElementSpacing = 0 1 1"]), "invalid voxel spacing (0, 1, 1)"),
    "spacing_negative.mha": (lambda p: _metaimage(p, ["ElementSpacing = 1 -1 1"]), "invalid voxel spacing"),
    "spacing_nan.mha": (lambda p: _metaimage(p, ["ElementSpacing = nan 1 1"]), "ElementSpacing holds NaN"),
    "origin_nan.mha": (lambda p: _metaimage(p, ["Offset = nan 0 0"]), "Offset holds NaN"),
    "singular.mha": (lambda p: _metaimage(p, ["TransformMatrix = 1 0 0 1 0 0 0 0 1"]), "the direction is singular"),
    "sheared.mha": (lambda p: _metaimage(p, ["TransformMatrix = 1 0 0 0.5 0.8660254 0 0 0 1"]), "not orthogonal"),
    "huge.mha": (lambda p: _metaimage(p, [], dims="100000 100000 100000", data=b"xx"), "implausible size"),
    "short.mha": (lambda p: _metaimage(p, [], dims="64 64 64", data=b"xx"), "truncated: the header declares 524,"),
    "bomb.mha": (lambda p: _metaimage(p, ["CompressedData = True", "CompressedDataSize = 20"], dims="1000 1000 1000",
                                      data=b"x" * 20), "20 bytes of compressed data cannot hold"),
    "vector.mha": (lambda p: _metaimage(p, ["ElementNumberOfChannels = 3"], data=ZEROS * 3), "3 components per voxel"),
    "four_d.mha": (lambda p: _metaimage(p, [], dims="4 3 2 3", ndims=4, data=ZEROS * 3), "(3 volumes or components"),
    "two_d.mha": (lambda p: _metaimage(p, [], dims="4 3", ndims=2, data=ZEROS), "(a 2D image)"),
    "empty_axis.mha": (lambda p: _metaimage(p, [], dims="4 3 0", data=b""), "has no voxels"),
    "missing_data.mha": (lambda p: p.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 3 2\n"
                                                 "ElementType = MET_SHORT\nElementDataFile = gone.raw\n"),
                         "its data file gone.raw is missing"),
    "zero_axis.nrrd": (lambda p: _nrrd(p, [*NRRD_BASE, "space directions: (0,0,0) (0,1,0) (0,0,1)"], ZEROS),
                       "invalid voxel spacing (0, 1, 1)"),
    "parallel.nrrd": (lambda p: _nrrd(p, [*NRRD_BASE, "space directions: (1,0,0) (1,0,0) (0,0,1)"], ZEROS),
                      "the direction is singular"),
    "nan_origin.nrrd": (lambda p: _nrrd(p, [*NRRD_BASE, "space directions: (1,0,0) (0,1,0) (0,0,1)",
                                            "space origin: (nan,0,0)"], ZEROS), "not a readable NRRD image"),
    "short.nrrd": (lambda p: _nrrd(p, [*NRRD_BASE[:4], "sizes: 400 300 200"], ZEROS), "truncated: the header declares"),
    "detached_short.nhdr": (lambda p: (_nrrd(p, [*NRRD_BASE, "data file: short.raw"], b""),
                                       (p.parent / "short.raw").write_bytes(ZEROS[:10])),
                            "truncated: the header declares 48 bytes"),
    "bomb.nrrd": (lambda p: _nrrd(p, [*NRRD_BASE[:2], "encoding: gzip", "sizes: 2000 2000 2000"], b"\x1f\x8b" + b"\0" * 30),
                  "NRRD"),
    "complex.nrrd": (lambda p: _nrrd(p, ["type: float", "dimension: 4", "encoding: raw", "endian: little",
                                         "sizes: 2 4 3 2", "kinds: complex domain domain domain"],
                                     np.zeros(48, np.float32).tobytes()), "2 components per voxel (complex"),
    "inf.nrrd": (lambda p: _nrrd(p, ["type: double", *NRRD_BASE[1:]], np.full(24, np.inf).tobytes()),
                 "contains 24 NaN/infinite voxels"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(ITK_REFUSED))
def test_itk_header_that_cannot_be_trusted_is_refused(tmp_path: Path, name: str) -> None:
    write, fragment = ITK_REFUSED[name]
    write(tmp_path / name)
    _refused(tmp_path / name, fragment)


def test_itk_singleton_extra_dimensions_and_one_slice_are_3d(tmp_path: Path) -> None:
    _metaimage(tmp_path / "five.mha", ["ElementSpacing = 0.5 0.7 2 1 1"], dims="4 3 2 1 1", ndims=5)
    scan = read_scan(tmp_path / "five.mha")
    assert scan.shape == (4, 3, 2) and scan.spacing == pytest.approx((0.5, 0.7, 2.0))
    np.testing.assert_array_equal(scan.array, np.arange(24, dtype=np.int16).reshape(2, 3, 4).transpose(2, 1, 0))
    _metaimage(tmp_path / "slice.mha", [], dims="4 3 1")
    assert read_scan(tmp_path / "slice.mha").shape == (4, 3, 1)


def test_permission_error_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medvit.pipelines import io as scan_io

    path = tmp_path / "locked.nii.gz"
    _nifti(path)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(args[0]))

    monkeypatch.setattr(scan_io, "open", denied, raising=False)
    _refused(path, "cannot read (Permission denied)")


@pytest.mark.parametrize("name", ["packed.nrrd", "packed.mha", "detached.mhd", "detached.nhdr"])
def test_compressed_and_detached_itk_files_are_read(tmp_path: Path, name: str) -> None:
    import SimpleITK as sitk

    array = (np.arange(120) % 7).reshape(4, 5, 6).astype(np.int16)  # (k, j, i)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / name), name.startswith("packed"))
    scan = read_scan(tmp_path / name)
    np.testing.assert_array_equal(scan.array, array.transpose(2, 1, 0))
    assert scan.spacing == pytest.approx((0.5, 0.75, 2.0))
    np.testing.assert_allclose(scan.affine[:3, 3], [-10.0, 5.0, 3.0])
