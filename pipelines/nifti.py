"""NIfTI-1/2 reading that checks the raw header before nibabel sees it; writing new volumes.

nibabel repairs some header faults on load (a negative or zero pixdim becomes positive, an
unknown xform code becomes 0, ...) with a log line, and reads others literally (voxels at
byte 0 when ``vox_offset`` is 0, a 100000^3 shape allocated before the file is found
short). Here the header is parsed without repairs and refused, with the file and the
field, when it cannot be trusted:

- the orientation: ``sform`` or ``qform`` with code > 0 must be finite and non-singular
  (nibabel uses the sform when its code is > 0, else the qform), the quaternion must be a
  rotation, and a header with both codes 0 (no patient orientation, so left and right
  are unknown) is refused;
- ``pixdim[1:4]`` finite and positive; spatial units mm or unset (not m or um);
- the shape: 3D, or 3D with trailing singleton dimensions; voxel type integer or float;
- no non-scalar intent (vectors, matrices, point sets, warp fields, CIFTI);
- ``vox_offset`` after the header, and the file (or its gzip stream) long enough for the
  voxels it declares, checked before they are read;
- intensity scaling: a slope of 0 or non-finite means none (NIfTI standard; nibabel and
  ITK agree); a finite slope with a non-finite intercept is refused.

:func:`write_nifti` writes a volume made in code (a preprocessed case, a phantom); masks
of a scan are written by :func:`medvit.pipelines.io.write_mask` on the scan's own header.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.errors import ScanError, short_reason
from medvit.pipelines.scan_checks import (
    check_grid,
    check_payload,
    check_spacing,
    check_voxel_budget,
    check_voxel_type,
    squeeze_to_3d,
)

__all__ = ["NiftiHeader", "check_nifti", "read_nifti", "write_nifti"]

_GZIP_MAGIC = b"\x1f\x8b"
_SINGLE_FILE_MAGIC = {348: b"n+1", 540: b"n+2"}
_UNITS = {0: None, 1: "meters", 2: None, 3: "micrometres"}
_VALID_XFORM_CODES = frozenset(range(6))
# Intents whose voxels are not one scalar image: matrices, vectors, point sets, meshes,
# colour vectors, FSL warp coefficients and CIFTI matrices.
_NON_SCALAR_INTENTS = frozenset([*range(1004, 1011), *range(2002, 2020)])
_CIFTI_INTENTS = range(3000, 3100)
# nibabel's limit for b^2 + c^2 + d^2 beyond 1 (float32 rounding of a unit quaternion).
_QUATERNION_SLACK = 3 * float(np.finfo(np.float32).eps)


def _raw_header(path: Path) -> tuple[nib.Nifti1Header, bool]:
    """The header as stored (no repairs), and whether the file is gzip-compressed."""
    with open(path, "rb") as fh:
        compressed = fh.read(2) == _GZIP_MAGIC
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error) as exc:
        raise ScanError.at(path, f"not a readable NIfTI file (damaged gzip data: {short_reason(exc)})") from None
    for endian in ("<", ">"):
        size = struct.unpack(f"{endian}i", head[:4])[0] if len(head) >= 4 else 0
        if size in _SINGLE_FILE_MAGIC:
            break
    else:
        raise ScanError.at(path, "not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header at its start)")
    if len(head) < size:
        raise ScanError.at(path, f"not a readable NIfTI file (truncated header: {len(head)} of {size} bytes)")
    gz_name = path.name.lower().endswith(".gz")
    if gz_name and not compressed:
        raise ScanError.at(path, "named .nii.gz but not gzip-compressed (rename it to .nii)")
    if compressed and not gz_name:
        raise ScanError.at(path, "gzip-compressed but named .nii (rename it to .nii.gz)")
    klass = nib.Nifti1Header if size == 348 else nib.Nifti2Header
    try:
        header = klass(head[:size], endianness=endian, check=False)
    except Exception as exc:
        raise ScanError.at(path, f"not a readable NIfTI header ({short_reason(exc)})") from None
    magic = bytes(header["magic"]).rstrip(b"\0")
    if magic != _SINGLE_FILE_MAGIC[size]:
        if magic in (b"ni1", b"ni2"):
            raise ScanError.at(
                path, f"a NIfTI header/image pair (magic {magic.decode()}): its voxels are in a separate .img file"
            )
        raise ScanError.at(path, f"not a single-file NIfTI (magic {magic!r}, expected {_SINGLE_FILE_MAGIC[size]!r})")
    return header, compressed


def _check_dtype(path: Path, header: nib.Nifti1Header) -> np.dtype:
    code = int(header["datatype"])
    try:
        dtype = np.dtype(header.get_data_dtype())
    except Exception:
        raise ScanError.at(path, f"unsupported voxel type code {code} (datatype)") from None
    label = nib.nifti1.data_type_codes.label.get(code, str(dtype))
    check_voxel_type(path, dtype, described=f"{label} (datatype {code})")
    return dtype


def _check_intent_and_units(path: Path, header: nib.Nifti1Header) -> None:
    intent = int(header["intent_code"])
    if intent in _NON_SCALAR_INTENTS or intent in _CIFTI_INTENTS:
        label = nib.nifti1.intent_codes.label.get(intent, "non-scalar")
        raise ScanError.at(path, f"holds {label} data (intent_code {intent}), not a scalar image")
    unit = _UNITS.get(int(header["xyzt_units"]) & 0x07)
    if unit is not None:
        raise ScanError.at(path, f"spatial unit is {unit} (xyzt_units); medvit reads voxel sizes in millimetres")


def _check_orientation(path: Path, header: nib.Nifti1Header) -> str:
    """Validate every orientation record with a code > 0; return the one nibabel uses."""
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    for name, code in (("qform_code", qcode), ("sform_code", scode)):
        if code not in _VALID_XFORM_CODES:
            raise ScanError.at(path, f"invalid {name} {code} (expected 0 to 5)")
    if qcode == 0 and scode == 0:
        raise ScanError.at(
            path, "no patient orientation (qform_code and sform_code are both 0), so left and right are unknown"
        )
    if scode > 0:
        srow = np.stack([header["srow_x"], header["srow_y"], header["srow_z"]]).astype(np.float64)
        check_grid(path, srow[:, :3], srow[:, 3], "sform")
    if qcode > 0:
        bcd = np.array([header["quatern_b"], header["quatern_c"], header["quatern_d"]], dtype=np.float64)
        offset = np.array([header["qoffset_x"], header["qoffset_y"], header["qoffset_z"]], dtype=np.float64)
        qfac = float(header["pixdim"][0])
        if not (np.all(np.isfinite(bcd)) and np.all(np.isfinite(offset))):
            raise ScanError.at(path, "the qform holds NaN or infinite values")
        if float(bcd @ bcd) > 1.0 + _QUATERNION_SLACK:
            raise ScanError.at(path, f"the qform quaternion is not a rotation (b^2 + c^2 + d^2 = {float(bcd @ bcd):.4g} > 1)")
        if qfac not in (-1.0, 0.0, 1.0):
            raise ScanError.at(path, f"invalid qfac pixdim[0] = {qfac:g} (expected 1 or -1)")
        try:
            qform = header.get_qform()
        except Exception as exc:
            raise ScanError.at(path, f"the qform cannot be computed ({short_reason(exc)})") from None
        check_grid(path, qform[:3, :3], qform[:3, 3], "qform")
    return "sform" if scode > 0 else "qform"


def _scaling(path: Path, header: nib.Nifti1Header) -> bool:
    slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    if not np.isfinite(slope) or slope == 0.0:
        return False  # the NIfTI standard's "no scaling"
    if not np.isfinite(inter):
        raise ScanError.at(path, f"invalid intensity scaling (scl_slope {slope:g} with scl_inter {inter})")
    return (slope, inter) != (1.0, 0.0)


@dataclass(frozen=True)
class NiftiHeader:
    """A single-file NIfTI scan whose header passed every check; no voxel read yet.

    Attributes:
        image: nibabel's image (its voxels are a lazy proxy).
        shape: Dimensions as the header declares them (extra singleton ones included).
        affine: The RAS affine nibabel derives.
        dtype: Voxel type on disk.
        scaled: Whether `scl_slope` / `scl_inter` change the stored values.
    """

    image: nib.Nifti1Image
    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype
    scaled: bool


def check_nifti(path: Path, one_volume: bool = True) -> NiftiHeader:
    """Every check of a single-file NIfTI scan that needs no voxel: header fields, geometry,
    memory, and that the file holds the bytes its header declares.

    Args:
        path: The file.
        one_volume: Refuse shapes that are not one 3D volume (`squeeze_to_3d`) first; with
            False the caller judges channels and dimensions from `NiftiHeader.shape`.

    Raises:
        ScanError: The header cannot be trusted or the file is too short for it.
    """
    raw, compressed = _raw_header(path)
    ndim = int(raw["dim"][0])
    if not 1 <= ndim <= 7:
        raise ScanError.at(path, f"invalid dim[0] = {ndim} (number of dimensions must be 1 to 7)")
    full_shape = tuple(int(d) for d in raw["dim"][1 : ndim + 1])
    if one_volume or any(d <= 0 for d in full_shape):
        squeeze_to_3d(path, full_shape)
    disk_dtype = _check_dtype(path, raw)
    _check_intent_and_units(path, raw)
    check_spacing(path, np.asarray(raw["pixdim"][1:4], dtype=np.float64), "size (pixdim)")
    used = _check_orientation(path, raw)
    scaled = _scaling(path, raw)
    float_type = np.dtype(np.float64 if disk_dtype == np.float64 else np.float32)

    offset = float(raw["vox_offset"])
    minimum = raw.single_vox_offset if hasattr(raw, "single_vox_offset") else len(raw.binaryblock) + 4
    if not np.isfinite(offset) or offset < minimum:
        raise ScanError.at(path, f"invalid voxel data offset (vox_offset = {offset:g}; at least {minimum} in a .nii file)")
    per_voxel = disk_dtype.itemsize + (float_type.itemsize if scaled else 0)
    check_voxel_budget(path, full_shape, per_voxel, str(disk_dtype))
    nbytes = int(np.prod(full_shape, dtype=object)) * disk_dtype.itemsize
    try:
        check_payload(path, int(offset), nbytes, compressed)
    except OSError as exc:
        raise ScanError.at(path, f"cannot read file ({short_reason(exc)})") from None

    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img = nib.load(str(path))
    except MemoryError:
        raise
    except Exception as exc:
        raise ScanError.at(path, f"not a readable NIfTI file ({short_reason(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)) or tuple(img.shape) != full_shape:
        raise ScanError.at(path, f"not a NIfTI image nibabel agrees on (read as {type(img).__name__} {img.shape})")
    affine = np.array(img.affine, dtype=np.float64)
    check_grid(path, affine[:3, :3], affine[:3, 3], used)
    return NiftiHeader(img, full_shape, affine, disk_dtype, scaled)


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a single-file NIfTI scan after checking its header (`check_nifti`).

    Returns:
        The voxels (i, j, k) in native byte order (float32, or float64 for float64 files,
        when the header scales intensities), the RAS affine nibabel derives, and the header.

    Raises:
        ScanError: The header cannot be trusted, the file is too short for it, or the
            voxels are not one 3D scalar volume.
    """
    info = check_nifti(path)
    shape = squeeze_to_3d(path, info.shape)
    float_type = np.dtype(np.float64 if info.dtype == np.float64 else np.float32)
    try:
        # A slope that overflows float32 gives inf voxels, refused below as non-finite.
        with np.errstate(over="ignore", invalid="ignore"):
            array = info.image.get_fdata(dtype=float_type) if info.scaled else np.asarray(info.image.dataobj)
    except MemoryError:
        raise
    except Exception as exc:
        raise ScanError.at(path, f"damaged or truncated NIfTI file ({short_reason(exc)})") from None
    array = array.reshape(shape)
    if not array.dtype.isnative:
        # torch.from_numpy refuses big-endian arrays.
        array = array.astype(array.dtype.newbyteorder("="))
    return array, info.affine, info.image.header


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write `array` (i, j, k) with its own voxel type as NIfTI-1, atomically.

    The affine is recorded as both qform and sform, scanner coordinates (code 1), in mm.

    Returns:
        `path`.
    """
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    return write_atomic(path, lambda tmp: nib.save(image, str(tmp)))
