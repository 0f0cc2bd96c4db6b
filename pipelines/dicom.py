"""DICOM series folders: pick the series, check it is one intact volume, read it.

GDCM, left to itself, drops a file it cannot parse from a series and ITK stacks whatever
is left, so a truncated slice in the middle of a series gives a volume with one slice
missing and a slice spacing stretched to cover the gap. Here every file's header is read
first and the series must be a complete, regular stack before any voxel is read, much as
dicom2nifti (TotalSegmentator's converter) validates a series; dcm2niix instead warns and
writes such series. Refused, each with a message naming the files involved:

- a file that looks like a DICOM image but cannot be read (damaged or truncated);
- several image series in one folder (apart from localizers/scouts and single images);
- multi-frame files, single slices, colour images, slices of different sizes;
- slices without a position or orientation, mixed orientations, duplicated positions;
- a gap in the slice positions (missing slices), otherwise uneven slice spacing, and
  slices not stacked along their normal (gantry tilt, sheared series).

Non-image DICOM objects (structured reports, RT structure sets, presentation states...)
and files that are not DICOM at all are ignored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medvit.pipelines.errors import ScanError
from medvit.pipelines.scan_checks import check_voxel_budget

if TYPE_CHECKING:
    import SimpleITK as sitk

__all__ = ["dicom_file_problem", "quiet_itk", "read_dicom_series"]

# Image storage SOP classes (PS3.4 B.5): a file of one of these that cannot be read is damaged.
_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR, DX, mammography, intra-oral
    "1.2.840.10008.5.1.4.1.1.2",  # CT, enhanced and legacy CT
    "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.6",  # ultrasound
    "1.2.840.10008.5.1.4.1.1.4",  # MR, enhanced MR
    "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
    "1.2.840.10008.5.1.4.1.1.12", "1.2.840.10008.5.1.4.1.1.13",  # X-ray angiography, tomosynthesis
    "1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.30",  # NM, parametric map
    "1.2.840.10008.5.1.4.1.1.128", "1.2.840.10008.5.1.4.1.1.130",  # PET
    "1.2.840.10008.5.1.4.1.1.481.1", "1.2.840.10008.5.1.4.1.1.481.2",  # RT image, RT dose
)  # fmt: skip
_DICOM_NAME_SUFFIXES = (".dcm", ".dicom", ".ima")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
# Positions are decimal strings of limited precision: mm tolerances for "same".
_SAME_POSITION_MM = 0.01
_SPACING_REL_TOL = 0.01
_SPACING_ABS_TOL_MM = 0.01
_ORIENTATION_TOL = 1e-3
_SHOWN_FILES = 3


@contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's own warnings (GDCM's "No Series were found", ITK's spacing notes).

    ITK prints them straight to stderr; the ScanError raised instead is what the user sees.
    """
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


@dataclass
class _Slice:
    path: Path
    series: str
    series_label: str
    image_type: str
    rows: int
    columns: int
    frames: int
    samples: int
    orientation: np.ndarray | None
    position: np.ndarray | None
    pixel_spacing: tuple[float, ...] | None
    instance: int | None
    rescale: tuple[str, str]
    pixel_id: int


def _meta_sop_class(path: Path) -> str | None:
    """The SOP class UID of a DICOM Part 10 file's meta header; None when it cannot be parsed."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(8192)
    except OSError:
        return None
    if data[128:132] != b"DICM":
        return None
    pos, sop = 132, None
    while pos + 8 <= len(data):
        group, element = int.from_bytes(data[pos : pos + 2], "little"), int.from_bytes(data[pos + 2 : pos + 4], "little")
        if group != 0x0002:
            return sop
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length, pos = int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
        else:
            length, pos = int.from_bytes(data[pos + 6 : pos + 8], "little"), pos + 8
        if pos + length > len(data):
            return None
        if element == 0x0002:
            sop = data[pos : pos + length].rstrip(b"\0 ").decode("ascii", "replace")
        pos += length
    return sop if pos == len(data) and len(data) < 8192 else None


def _looks_like_damaged_image(path: Path) -> bool:
    """For a file GDCM could not read: is it a damaged image rather than something else?

    Slice files carry no extension, a DICOM one, or a numeric one (``CT.1.2.840...``); a
    file named so that cannot be read is taken for a slice cut short (even before its
    ``DICM`` marker). Other names (``notes.txt``, ``thumb.png``) are not slices.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return True
    if head[128:132] != b"DICM":
        suffix = path.suffix.lower()
        return suffix in _DICOM_NAME_SUFFIXES or suffix == "" or suffix[1:].isdigit()
    sop = _meta_sop_class(path)
    # A meta header that cannot be parsed is a damaged file; a known non-image object
    # (report, structure set, presentation state...) is legitimately not an image.
    return sop is None or sop == "" or sop.startswith(_IMAGE_SOP_PREFIXES)


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
# Headers (with any icon image) end well within this; a longer one is left to GDCM.
_HEADER_SCAN_BYTES = 1 << 20


def _pixel_data_cut_short(path: Path) -> bool:
    """Whether the file ends before its pixel data does.

    GDCM needs seconds to give up on such a file; this is a byte-level look at the first
    PixelData element: an explicit length must fit in the file, and compressed
    (encapsulated) data must end with its sequence delimiter.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_SCAN_BYTES)
            fh.seek(max(0, size - 64))
            tail = fh.read()
    except OSError:
        return True
    # The first match is the dataset's own element (or an icon's, before it); a later
    # one could be compressed bytes that happen to look like the tag.
    at = head.find(_PIXEL_DATA_TAG, 132)
    if at < 0 or at + 12 > len(head):
        return False
    vr = head[at + 4 : at + 6]
    if vr in (b"OB", b"OW"):
        length, start = int.from_bytes(head[at + 8 : at + 12], "little"), at + 12
    else:  # implicit VR
        length, start = int.from_bytes(head[at + 4 : at + 8], "little"), at + 8
    if length == 0xFFFFFFFF:
        return not tail.rstrip(b"\0").endswith(_SEQUENCE_END[:4])
    return start + length > size


def _floats(text: str) -> np.ndarray | None:
    try:
        values = np.array([float(v) for v in text.replace(" ", "").split("\\") if v != ""], dtype=np.float64)
    except ValueError:
        return None
    return values if np.all(np.isfinite(values)) else None


def _read_slice(path: Path) -> _Slice | None:
    """Header of one file, or None when GDCM cannot read it as an image."""
    import SimpleITK as sitk

    if _pixel_data_cut_short(path):
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except Exception:
        return None

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    def integer(key: str, default: int | None) -> int | None:
        try:
            return int(float(tag(key)))
        except ValueError:
            return default

    orientation, position = _floats(tag("0020|0037")), _floats(tag("0020|0032"))
    spacing = _floats(tag("0028|0030"))
    number, description, uid = tag("0020|0011"), tag("0008|103e"), tag("0020|000e")
    label = " ".join(
        part for part in (f"#{number}" if number else "", f"'{description}'" if description else "") if part
    ) or (f"UID ...{uid[-16:]}" if uid else "without a SeriesInstanceUID")
    return _Slice(
        path=path,
        series=tag("0020|000e"),
        series_label=label,
        image_type=tag("0008|0008").upper(),
        rows=int(reader.GetSize()[1]),
        columns=int(reader.GetSize()[0]),
        frames=integer("0028|0008", 1) or 1,
        samples=integer("0028|0002", 1) or 1,
        orientation=orientation if orientation is not None and orientation.size == 6 else None,
        position=position if position is not None and position.size == 3 else None,
        pixel_spacing=tuple(spacing) if spacing is not None and spacing.size == 2 else None,
        instance=integer("0020|0013", None),
        rescale=(tag("0028|1053") or "1", tag("0028|1052") or "0"),
        pixel_id=int(reader.GetPixelID()),
    )


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:_SHOWN_FILES])
    return shown + (f" and {len(paths) - _SHOWN_FILES} more" if len(paths) > _SHOWN_FILES else "")


def dicom_file_problem(path: Path) -> str:
    """Why a single DICOM file is not read as a scan (a single slice or a multi-frame object)."""
    with quiet_itk():
        info = _read_slice(path)
    if info is None:
        return "not a readable DICOM image (damaged, truncated, or not an image)"
    if info.frames > 1:
        return (
            f"a multi-frame DICOM file ({info.frames} frames); its frame geometry is not checked here, "
            "convert it to NIfTI (dcm2niix) first"
        )
    return "a single DICOM slice; pass the folder that holds the whole series"


def _candidates(folder: Path) -> list[Path]:
    """The files that may be slices: visible, not DICOMDIR, not scans of another format."""
    from medvit.pipelines.io import SCAN_SUFFIXES

    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise ScanError.at(folder, f"cannot list folder ({exc.strerror or exc})") from None
    if not entries:
        raise ScanError.at(folder, "folder is empty")
    return [
        p for p in entries
        if p.name.upper() != "DICOMDIR" and not p.name.lower().endswith(SCAN_SUFFIXES) and p.is_file()
    ]  # fmt: skip


def _pick_series(folder: Path, slices: list[_Slice]) -> list[_Slice]:
    groups: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        groups[s.series].append(s)
    if len(groups) == 1:
        return slices
    volumes = [g for g in groups.values() if len(g) > 1 and not any("LOCALIZER" in s.image_type for s in g)]
    if len(volumes) == 1:
        return volumes[0]
    listed = volumes or list(groups.values())
    described = "; ".join(f"{g[0].series_label}: {len(g)} files" for g in sorted(listed, key=len, reverse=True))
    raise ScanError.at(
        folder, f"holds {len(listed)} DICOM image series ({described}); put each series in a folder of its own"
    )


def _check_slices(folder: Path, series: list[_Slice]) -> tuple[list[_Slice], float, np.ndarray]:
    """Sort the series along its normal and check it is one regular stack.

    Returns:
        The slices in stack order, the slice spacing (mm) and the first slice's position.
    """
    multi = [s.path for s in series if s.frames > 1]
    if multi:
        raise ScanError.at(
            folder, f"holds multi-frame DICOM files ({_names(multi)}); convert them to NIfTI (dcm2niix) first"
        )
    if len(series) < 2:
        raise ScanError.at(folder, f"a single DICOM slice ({series[0].path.name}); a 3D scan needs at least 2")
    colour = [s.path for s in series if s.samples != 1]
    if colour:
        raise ScanError.at(folder, f"colour (RGB) DICOM images ({_names(colour)}); expected single-channel slices")
    first = series[0]
    sizes = {(s.rows, s.columns) for s in series}
    if len(sizes) > 1:
        raise ScanError.at(folder, f"slices of different sizes {sorted(sizes)} in one series")
    unplaced = [s.path for s in series if s.orientation is None or s.position is None]
    if unplaced:
        raise ScanError.at(
            folder,
            f"slices without a valid ImagePositionPatient/ImageOrientationPatient ({_names(unplaced)}); "
            "they cannot be placed in 3D",
        )
    orientations = np.stack([s.orientation for s in series])  # type: ignore[misc]
    positions = np.stack([s.position for s in series])  # type: ignore[misc]
    mixed = [s.path for s, o in zip(series, orientations) if np.max(np.abs(o - orientations[0])) > _ORIENTATION_TOL]
    if mixed:
        raise ScanError.at(
            folder,
            f"mixed slice orientations: {_names(mixed)} differ from {first.path.name} (ImageOrientationPatient)",
        )
    row, col = orientations[0, :3], orientations[0, 3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2):
        raise ScanError.at(folder, "invalid ImageOrientationPatient (row and column directions are not orthonormal)")
    spacings = {s.pixel_spacing for s in series}
    if len(spacings) > 1:
        raise ScanError.at(folder, "slices with different pixel spacings (PixelSpacing) in one series")

    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    order = np.argsort(positions @ normal, kind="stable")
    ordered, positions = [series[i] for i in order], positions[order]
    heights = positions @ normal
    steps = np.diff(heights)
    same = np.flatnonzero(steps <= _SAME_POSITION_MM)
    if same.size:
        i = int(same[0])
        raise ScanError.at(
            folder,
            f"{same.size} duplicated slice position(s): {ordered[i].path.name} and {ordered[i + 1].path.name} are both "
            f"at {heights[i]:.2f} mm (copied files, or several images per position: echoes, phases, time points)",
        )
    base = float(np.median(steps))
    tol = max(_SPACING_ABS_TOL_MM, _SPACING_REL_TOL * base)
    irregular = np.flatnonzero(np.abs(steps - base) > tol)
    if irregular.size:
        smallest = float(steps.min())
        multiples = steps / smallest
        i = int(np.argmax(steps))
        if np.all(np.abs(multiples - np.round(multiples)) * smallest <= tol) and multiples.max() >= 1.5:
            missing = int(np.sum(np.round(multiples) - 1))
            numbers = (ordered[i].instance, ordered[i + 1].instance)
            numbered = f" (InstanceNumber {numbers[0]} and {numbers[1]})" if None not in numbers else ""
            raise ScanError.at(
                folder,
                f"missing slices: a gap of {steps[i]:.3g} mm between {ordered[i].path.name} and "
                f"{ordered[i + 1].path.name}{numbered} in a series spaced {smallest:.3g} mm "
                f"(about {missing} slice(s) absent)",
            )
        raise ScanError.at(
            folder, f"uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm); a volume needs equal spacing"
        )
    deltas = np.diff(positions, axis=0)
    in_plane = deltas - np.outer(deltas @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    if np.any(drift > max(_SPACING_ABS_TOL_MM, _SPACING_REL_TOL * base)):
        raise ScanError.at(
            folder,
            f"slices are not stacked along their normal (shifted {drift.max():.3g} mm sideways per slice: "
            "gantry tilt or a sheared series); correct it with dcm2niix first",
        )
    return ordered, base, positions[0]


def read_dicom_series(folder: Path) -> tuple[sitk.Image, tuple[Path, ...]]:
    """Read the one image series in `folder` after checking it is a complete, regular stack.

    Returns:
        The image, and its slice files in stack order: slice `k` of the image (ITK's z)
        is `files[k]`.

    Raises:
        ScanError: The folder holds no series, several, or one that is not one intact volume.
    """
    import SimpleITK as sitk

    files = _candidates(folder)
    slices, damaged = [], []
    for path in files:
        with quiet_itk():
            info = _read_slice(path)
        if info is not None:
            slices.append(info)
        elif _looks_like_damaged_image(path):
            damaged.append(path)
    if damaged:
        raise ScanError.at(folder, f"{len(damaged)} damaged or truncated DICOM file(s): {_names(damaged)}")
    if not slices:
        raise ScanError.at(folder, "no DICOM series found in folder")
    ordered, spacing, first = _check_slices(folder, _pick_series(folder, slices))

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in ordered])
    pixel_id = ordered[0].pixel_id
    if len({s.rescale for s in ordered}) > 1:
        # Per-slice rescaling (PET does this) must not be cast to the first slice's integers.
        pixel_id = sitk.sitkFloat32
        reader.SetOutputPixelType(pixel_id)
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype.itemsize
    check_voxel_budget(folder, (ordered[0].columns, ordered[0].rows, len(ordered)), itemsize, f"{itemsize}-byte voxels")
    try:
        with quiet_itk():
            image = reader.Execute()
    except MemoryError:
        raise
    except Exception:
        raise ScanError.at(folder, f"DICOM series of {len(ordered)} files could not be read (damaged slices)") from None
    # GDCM and ITK place the stack themselves: it must be the stack checked above.
    if (
        image.GetSize()[2] != len(ordered)
        or abs(image.GetSpacing()[2] - spacing) > max(_SPACING_ABS_TOL_MM, _SPACING_REL_TOL * spacing)
        or np.max(np.abs(np.array(image.GetOrigin()) - first)) > _SPACING_ABS_TOL_MM * 10
    ):
        raise ScanError.at(
            folder, "the DICOM reader placed the slices differently from their positions (inconsistent headers)"
        )
    return image, tuple(s.path for s in ordered)
