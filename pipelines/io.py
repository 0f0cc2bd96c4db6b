"""Scan reading and mask writing: NIfTI, NRRD, MetaImage and DICOM series.

Every scan comes back as a :class:`Scan` in one convention, whatever the file format:
the voxel array in file voxel order (i, j, k) and a 4x4 affine mapping (i, j, k) to
RAS world millimetres, as nibabel does. Files read through ITK (NRRD, MHA/MHD, DICOM)
are LPS internally; their affine is flipped to RAS exactly as MONAI's ``ITKReader``
(``affine_lps_to_ras=True``) does, so a scan has the same affine whichever reader
MONAI is later pointed at.

A mask is always written as NIfTI on the scan's own grid. The writer reuses the
input's own geometry record (the NIfTI header fields, or the ITK origin, spacing and
direction) rather than re-deriving it from the affine, so no rounding creeps in, and
it writes atomically so a failed write never leaves a partial file behind.

Every problem a user can cause raises :class:`ScanError` with a one-line message that
names the file. Headers are checked before voxels are read (`medvit.pipelines.scan_checks`,
`medvit.pipelines.nifti`), and a DICOM folder must hold one complete, regular series
(`medvit.pipelines.dicom`): a damaged input is refused, never read onto a wrong grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.dicom import dicom_file_problem, quiet_itk as _quiet_itk, read_dicom_series
from medvit.pipelines.errors import ScanError, short_reason
from medvit.pipelines.nifti import read_nifti
from medvit.pipelines.scan_checks import (
    check_deflate_bound,
    check_grid,
    check_metaimage_numbers,
    check_payload,
    check_spacing,
    check_voxel_budget,
    check_voxel_type,
    itk_payload,
    squeeze_to_3d,
)

if TYPE_CHECKING:  # imported where used: NIfTI needs no SimpleITK, whose import costs ~60 MB
    import SimpleITK as sitk

__all__ = ["SCAN_SUFFIXES", "Scan", "find_scans", "is_dicom_folder", "read_scan", "scan_stem", "write_mask"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_FILE_SUFFIXES = {".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage"}
SCAN_SUFFIXES = NIFTI_SUFFIXES + tuple(ITK_FILE_SUFFIXES)
# Stripped from names to make output stems; longest first so ".nii.gz" wins over ".gz".
_STEM_SUFFIXES = (*SCAN_SUFFIXES, ".dcm", ".dicom", ".ima", ".gz")

# ITK is LPS, nibabel and MONAI (affine_lps_to_ras=True) are RAS: flip x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Enough files to recognise a DICOM folder without opening thousands of slices.
_DICOM_PROBE_FILES = 8


@dataclass(frozen=True)
class _ItkGeometry:
    """The ITK grid of a scan, kept verbatim so a mask lands on exactly the same grid."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # row-major 3x3, as SimpleITK's GetDirection


@dataclass
class Scan:
    """A 3D scan in nibabel's convention.

    Attributes:
        array: Voxel array in file voxel order (i, j, k), with the file's own dtype
            (float32 when the NIfTI header asks for intensity scaling).
        affine: 4x4 float64 matrix from voxel (i, j, k) to RAS world millimetres.
        path: What the user gave: a file, or a DICOM series folder.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    _nifti_header: nib.Nifti1Header | None = field(default=None, repr=False, compare=False)
    _itk_geometry: _ItkGeometry | None = field(default=None, repr=False, compare=False)
    _dicom_files: tuple[Path, ...] | None = field(default=None, repr=False, compare=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: ITK's own spacing, else the affine's column norms."""
        if self._itk_geometry is not None:
            return self._itk_geometry.spacing
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def dicom_files(self) -> tuple[Path, ...] | None:
        """The slice files of a DICOM series in stack order (slice `k` is `array[:, :, k]`); None for other formats."""
        return self._dicom_files

    @property
    def shape(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        i, j, k = self.array.shape
        return (int(i), int(j), int(k))

    @property
    def stem(self) -> str:
        """File name without its scan suffix; the folder name for a DICOM folder."""
        return scan_stem(Path(self.path))

    def orientation(self) -> str:
        """Axis codes of the voxel axes, such as ``"RAS"`` or ``"LPS"``."""
        return "".join(nib.aff2axcodes(self.affine))


def scan_stem(path: Path) -> str:
    """A scan's name without its format suffixes (`ct.nii.gz` -> `ct`); a folder's own name."""
    name = path.name
    lower = name.lower()
    for suffix in _STEM_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name




def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _is_scan_file_name(path: Path) -> bool:
    return path.name.lower().endswith(SCAN_SUFFIXES)


def _visible(entries: list[Path]) -> list[Path]:
    # Hidden files include our own ".tmp-*" partial writes and OS litter (.DS_Store).
    return [p for p in entries if not p.name.startswith(".")]


def is_dicom_folder(path: Path) -> bool:
    """Tell whether a folder holds DICOM slice files.

    Cheap on purpose: only the first few files (by name) are opened, looking for the
    ``DICM`` marker at byte 128. Files with a known non-DICOM scan suffix and the
    ``DICOMDIR`` index are not slices and are not looked at.

    Args:
        path: Folder to look into; anything else gives False.

    Returns:
        True when one of the probed files is a DICOM file.
    """
    path = Path(path)
    try:
        if not path.is_dir():
            return False
        entries = sorted(_visible(list(path.iterdir())))
    except OSError:
        return False
    probed = 0
    for entry in entries:
        if probed >= _DICOM_PROBE_FILES:
            break
        if _is_scan_file_name(entry) or entry.name.upper() == "DICOMDIR" or not entry.is_file():
            continue
        probed += 1
        if _has_dicom_magic(entry):
            return True
    return False


def find_scans(paths: Sequence[str | Path]) -> list[Path]:
    """Expand user inputs into the list of scans to process.

    A scan file stays itself; a DICOM series folder stays the folder; any other folder
    becomes the scan files directly inside it (sorted) followed by its DICOM
    sub-folders. Duplicates are dropped, keeping the first occurrence.

    Args:
        paths: Files and folders as the user gave them.

    Returns:
        Scan files and DICOM folders, in input order.

    Raises:
        ScanError: A path is missing, is not a scan, or is a folder without scans.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ScanError.at(path, "no such file or folder")
        if path.is_file():
            if not (_is_scan_file_name(path) or _has_dicom_magic(path)):
                raise ScanError.at(path, f"not a supported scan file (expected {', '.join(SCAN_SUFFIXES)} or DICOM)")
            found.append(path)
        elif is_dicom_folder(path):
            found.append(path)
        else:
            found.extend(_scans_in_folder(path))
    seen: set[Path] = set()
    unique = []
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _scans_in_folder(folder: Path) -> list[Path]:
    try:
        entries = sorted(_visible(list(folder.iterdir())))
    except OSError as exc:
        raise ScanError.at(folder, f"cannot list folder ({short_reason(exc)})") from None
    if not entries:
        raise ScanError.at(folder, "folder is empty")
    files = [p for p in entries if p.is_file() and _is_scan_file_name(p)]
    series = [p for p in entries if p.is_dir() and is_dicom_folder(p)]
    if not files and not series:
        raise ScanError.at(
            folder, f"no scans found in folder (looked for {', '.join(SCAN_SUFFIXES)} files and DICOM series folders)"
        )
    return files + series


def read_scan(path: str | Path) -> Scan:
    """Read a 3D scan from NIfTI, NRRD, MetaImage or a DICOM series folder.

    What is accepted: one 3D volume, including ``(x, y, 1)`` (one slice) and trailing
    singleton dimensions ``(x, y, z, 1, ...)``; integer or float voxels; a finite,
    non-singular geometry with positive voxel sizes; and, for DICOM, a folder holding one
    complete series of equally spaced, parallel slices.

    Args:
        path: A scan file, or a folder holding one DICOM image series (localizers and
            single images beside it are ignored).

    Returns:
        The scan in file voxel order with its RAS affine.

    Raises:
        ScanError: The path is missing, unreadable, empty, damaged, not an image, not one
            3D volume, has a geometry that cannot be trusted, declares more voxels than
            it holds or than memory allows, has NaN or infinite voxels, or is a DICOM
            series with missing, duplicated, damaged or inconsistent slices.
    """
    path = Path(path)
    lower = path.name.lower()
    try:
        if not path.exists():
            raise ScanError.at(path, "no such file or folder")
        if path.is_dir():
            if lower.endswith(SCAN_SUFFIXES):
                raise ScanError.at(path, "is a folder, not a scan file")
            image, files = read_dicom_series(path)
            return _scan_from_itk(path, image, files)
        if not path.is_file():
            raise ScanError.at(path, "not a regular file (a device, pipe or socket)")
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ScanError.at(path, f"cannot read ({exc.strerror or short_reason(exc)})") from None
    if size == 0:
        raise ScanError.at(path, "file is empty")
    try:
        if lower.endswith(NIFTI_SUFFIXES):
            array, affine, header = read_nifti(path)
            _check_finite(path, array)
            return Scan(array=array, affine=affine, path=path, _nifti_header=header)
        suffix = Path(lower).suffix
        if suffix in ITK_FILE_SUFFIXES:
            return _read_itk_file(path, ITK_FILE_SUFFIXES[suffix])
    except OSError as exc:  # the file vanished or became unreadable while being read
        raise ScanError.at(path, f"cannot read ({exc.strerror or short_reason(exc)})") from None
    if _has_dicom_magic(path) or lower.endswith((".dcm", ".dicom", ".ima")):
        raise ScanError.at(path, dicom_file_problem(path))
    raise ScanError.at(path, f"not a supported scan file (expected {', '.join(SCAN_SUFFIXES)}, or a DICOM series folder)")


def _check_finite(path: Path, array: np.ndarray) -> None:
    if array.dtype.kind != "f":
        return
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise ScanError.at(path, f"contains {bad} NaN/infinite voxels")


def _itk_voxel_type(path: Path, reader: sitk.ImageFileReader) -> np.dtype:
    import SimpleITK as sitk

    components = reader.GetNumberOfComponents()
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    if components != 1:
        raise ScanError.at(path, f"has {components} components per voxel ({pixel}); expected a single-channel image")
    if "complex" in pixel or "label" in pixel:
        raise ScanError.at(path, f"unsupported voxel type {pixel} (expected a single-channel integer or float image)")
    probe = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())
    dtype = sitk.GetArrayViewFromImage(probe).dtype
    check_voxel_type(path, dtype)
    return dtype


def _check_itk_header(path: Path, kind: str) -> None:
    """Shape, voxel type, geometry and payload size of an NRRD/MetaImage file, before its voxels are read."""
    import SimpleITK as sitk

    if kind == "MetaImage":
        check_metaimage_numbers(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
    except Exception:
        # ITK's messages are multi-line C++ traces; the file name and kind say enough.
        problem = f"not a readable {kind} image (damaged, truncated, not an image, or a data file is missing)"
        raise ScanError.at(path, problem) from None
    dim = reader.GetDimension()
    size = tuple(int(n) for n in reader.GetSize())
    squeeze_to_3d(path, size)
    dtype = _itk_voxel_type(path, reader)
    spacing = np.array(reader.GetSpacing(), dtype=np.float64)
    direction = np.array(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    origin = np.array(reader.GetOrigin(), dtype=np.float64)[:3]
    check_spacing(path, spacing[:3])
    check_grid(path, direction * spacing[:3], origin, "direction", orthonormal=True)
    nbytes = check_voxel_budget(path, size, dtype.itemsize, str(dtype))
    where = itk_payload(path, kind)
    if where is None:
        return
    data_file, offset, compressed = where
    if compressed:
        check_deflate_bound(path, data_file.stat().st_size - offset, nbytes)
    else:
        check_payload(data_file, offset, nbytes, compressed=False, header=path if data_file != path else None)


def _read_itk_file(path: Path, kind: str) -> Scan:
    import SimpleITK as sitk

    _check_itk_header(path, kind)
    try:
        with _quiet_itk():
            image = sitk.ReadImage(str(path))
    except MemoryError:
        raise
    except Exception:
        problem = f"not a readable {kind} image (damaged, truncated, not an image, or a data file is missing)"
        raise ScanError.at(path, problem) from None
    return _scan_from_itk(path, image)


def _scan_from_itk(path: Path, image: sitk.Image, dicom_files: tuple[Path, ...] | None = None) -> Scan:
    import SimpleITK as sitk

    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise ScanError.at(path, f"has {components} components per voxel; expected a single-channel image")
    dim = image.GetDimension()
    size = image.GetSize()
    shape = squeeze_to_3d(path, size)
    array = sitk.GetArrayFromImage(image)
    check_voxel_type(path, array.dtype)
    # ITK arrays are (k, j, i); transposing gives nibabel's voxel order without a copy.
    array = array.reshape(shape[::-1]).transpose(2, 1, 0)
    _check_finite(path, array)

    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.array(image.GetSpacing(), dtype=np.float64)[:3]
    origin = np.array(image.GetOrigin(), dtype=np.float64)[:3]
    check_spacing(path, spacing)
    check_grid(path, direction * spacing, origin, "direction", orthonormal=True)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = origin
    geometry = _ItkGeometry(
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        direction=tuple(float(v) for v in direction.ravel()),
    )
    return Scan(array=array, affine=_LPS_TO_RAS @ lps, path=path, _itk_geometry=geometry, _dicom_files=dicom_files)


def _mask_dtype(out_path: Path, mask: np.ndarray) -> np.dtype:
    if mask.dtype.kind not in "biu":
        raise ScanError.at(out_path, f"mask must hold integer labels, got dtype {mask.dtype}")
    if mask.size == 0:
        return np.dtype(np.uint8)
    low, high = int(mask.min()), int(mask.max())
    if low < 0:
        raise ScanError.at(out_path, f"mask has negative label {low}")
    if high > np.iinfo(np.uint16).max:
        raise ScanError.at(out_path, f"mask label {high} does not fit in uint16")
    return np.dtype(np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16)


def write_mask(mask: np.ndarray, scan: Scan, out_path: str | Path) -> Path:
    """Write a label mask as NIfTI on exactly the scan's grid.

    The mask is stored as uint8, or uint16 when a label exceeds 255. The file is
    written under a hidden temporary name in the target folder and renamed into place,
    so the target is either complete or untouched.

    Args:
        mask: Integer labels of shape ``scan.shape``, in the scan's (i, j, k) order.
        scan: The scan the mask was computed from.
        out_path: Target file; must end in ``.nii.gz`` (or ``.nii``). Missing parent
            folders are created.

    Returns:
        The path written.

    Raises:
        ScanError: The mask does not fit the scan, or the file cannot be written.
    """
    out_path = Path(out_path)
    if not out_path.name.lower().endswith(NIFTI_SUFFIXES) or out_path.name.lower() in NIFTI_SUFFIXES:
        raise ScanError.at(out_path, "masks are written as NIfTI; the output name must end in .nii.gz")
    mask = np.asarray(mask)
    if mask.shape != scan.shape:
        raise ScanError.at(out_path, f"mask shape {mask.shape} does not match the shape {scan.shape} of scan {scan.path}")
    mask = mask.astype(_mask_dtype(out_path, mask), copy=False)
    if out_path.is_dir():
        raise ScanError.at(out_path, "output path is a folder")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScanError.at(out_path, f"cannot create output folder ({short_reason(exc)})") from None

    # The temporary name keeps the real suffix: both writers pick the format from it.
    geometry = scan._itk_geometry
    try:
        if geometry is not None:
            return write_atomic(out_path, lambda tmp: _write_itk(mask, geometry, tmp))
        return write_atomic(out_path, lambda tmp: _write_nibabel(mask, scan, tmp))
    except ScanError:
        raise
    except Exception as exc:
        raise ScanError.at(out_path, f"cannot write mask ({short_reason(exc)})") from None


def _write_itk(mask: np.ndarray, geometry: _ItkGeometry, tmp: Path) -> None:
    import SimpleITK as sitk
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)))
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(geometry.direction)
    sitk.WriteImage(image, str(tmp), True)


# The header fields that define a NIfTI grid; copying them verbatim (not the affine)
# keeps qform quaternions and sform rows bit-identical to the input.
_NIFTI_GEOMETRY_FIELDS = (
    "pixdim", "xyzt_units", "dim_info", "qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d",
    "qoffset_x", "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z",
)  # fmt: skip


def _write_nibabel(mask: np.ndarray, scan: Scan, tmp: Path) -> None:
    source = scan._nifti_header
    if source is None:
        # A Scan built in code has only its affine: record it as scanner coordinates.
        image = nib.Nifti1Image(mask, scan.affine)
        image.header.set_qform(scan.affine, code=1)
        image.header.set_sform(scan.affine, code=1)
    else:
        # A fresh header drops intensity windows, intents and extensions that describe
        # the scan, not the mask.
        header = type(source)()
        for name in _NIFTI_GEOMETRY_FIELDS:
            header[name] = source[name]
        header.set_data_dtype(mask.dtype)
        image_class = nib.Nifti2Image if isinstance(source, nib.Nifti2Header) else nib.Nifti1Image
        image = image_class(mask, None, header=header)
    image.header.set_data_dtype(mask.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    nib.save(image, str(tmp))
