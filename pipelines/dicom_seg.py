"""DICOM Segmentation objects (SEG) of masks computed from DICOM series, with highdicom.

A SEG references the source series slice by slice: frame `f` of a segment is the mask on
the slice file it names (`ReferencedSOPInstanceUID`), so a PACS or viewer overlays it on
the series it came from. Segments are the labels written, numbered 1..n in label-id
order, each with its name, a coded type and the medvit model that made it. The mask goes
to highdicom as a label map (one integer per pixel), never as one boolean plane per
segment, and empty frames are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.errors import ScanError, short_reason
from medvit.pipelines.io import ITK_FILE_SUFFIXES, NIFTI_SUFFIXES, Scan
from medvit.pipelines.palette import label_colour

if TYPE_CHECKING:  # imported where used: `medvit segment` without --output-type dicom-seg needs neither
    import highdicom as hd
    import pydicom
    from pydicom.sr.coding import Code

__all__ = ["check_dicom_seg_input", "read_seg_sources", "segment_descriptions", "write_dicom_seg"]


def check_dicom_seg_input(path: Path, output_type: str) -> None:
    """Refuse, before any work, a scan file as input of a DICOM SEG: only a series folder has slices to reference.

    Raises:
        ScanError: `path` is a file (NIfTI, NRRD, MetaImage, a single DICOM file...).
    """
    path = Path(path)
    if path.is_dir() or not path.exists():
        return  # a folder is a series (read_scan checks it); a missing path fails when read
    lower = path.name.lower()
    suffix = Path(lower).suffix
    if lower.endswith(NIFTI_SUFFIXES):
        kind = "a NIfTI file"
    elif suffix in ITK_FILE_SUFFIXES:
        kind = f"a {ITK_FILE_SUFFIXES[suffix]} file"
    else:
        kind = "a single file, not a series folder"
    raise ScanError.at(path, f"--output-type {output_type} needs a DICOM series folder as input (this is {kind})")


def _property_type(name: str) -> Code:
    """The DICOM code of a label name: its entry in CID 7192 (Anatomical Structure
    Segmentation Property Type) when the name is one (`liver` -> SCT 10200004 Liver),
    else the generic SCT 85756007 Tissue."""
    from pydicom.sr.codedict import codes

    keyword = "".join(part.capitalize() for part in name.replace("-", "_").split("_") if part)
    return getattr(codes.cid7192, keyword, None) or codes.SCT.Tissue


def segment_descriptions(label_names: Mapping[int, str], model_name: str) -> list[hd.seg.SegmentDescription]:
    """One highdicom SegmentDescription per label, numbered 1..n in label-id order."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    import medvit

    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medvit {model_name}", family=codes.cid7162.ArtificialIntelligence, version=medvit.__version__
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label_names[lid],
            segmented_property_category=codes.cid7150.AnatomicalStructure,
            segmented_property_type=_property_type(label_names[lid]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*label_colour(lid)),
        )
        for number, lid in enumerate(sorted(label_names), start=1)
    ]


def _frames(mask: np.ndarray, label_ids: list[int]) -> np.ndarray:
    """The mask `(i, j, k)` = (column, row, slice) as highdicom's `(frames, rows, columns)`
    label map of segment numbers (label ids not written become background).

    Built slice by slice into a C-ordered array: highdicom compares each frame with each
    segment number, which is several times slower on a strided view of the mask.
    """
    numbers = np.zeros(max(max(label_ids), int(mask.max(initial=0))) + 1,
                       dtype=np.uint8 if len(label_ids) < 256 else np.uint16)
    numbers[label_ids] = np.arange(1, len(label_ids) + 1)
    frames = np.empty(mask.shape[::-1], dtype=numbers.dtype)
    for k in range(mask.shape[2]):
        frames[k] = numbers[mask[:, :, k].T]
    return frames


def read_seg_sources(scan: Scan) -> list[pydicom.Dataset]:
    """The headers of a series' slices in stack order, checked to be referable by a SEG.

    Cheap (no pixel data), so a scan that cannot have a SEG fails before its model runs.
    A slice whose dataset has a blank SOP Class or Instance UID gets it from its file
    meta, where it means the same (some anonymisers blank only the dataset's).

    Raises:
        ScanError: The scan is not a DICOM series, or its slices cannot be read again or
            lack the study, series or instance UIDs a SEG refers to.
    """
    import pydicom

    folder, files = scan.path, scan.dicom_files
    if files is None:
        raise ScanError.at(scan.path, "a DICOM SEG needs a DICOM series folder as input")
    sources = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # the file changed or vanished since the series was read
            problem = f"cannot read {path.name} again for the DICOM SEG ({short_reason(exc)})"
            raise ScanError.at(folder, problem) from None
        meta = getattr(ds, "file_meta", None) or {}
        for tag in ("SOPClassUID", "SOPInstanceUID"):
            if not ds.get(tag) and meta.get(f"MediaStorage{tag}"):
                setattr(ds, tag, meta.get(f"MediaStorage{tag}"))
        sources.append(ds)
    for tag in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        blank = [path.name for path, ds in zip(files, sources, strict=True) if not ds.get(tag)]
        if blank:
            which = "its slices have" if len(blank) == len(files) else f"{len(blank)} slice(s) ({blank[0]} ...) have"
            raise ScanError.at(
                folder, f"{which} no {tag} (anonymised?); a DICOM SEG must name the study, series and slices it is of"
            )
    if len({ds.SOPInstanceUID for ds in sources}) < len(sources):
        raise ScanError.at(folder, "slices share a SOPInstanceUID; a DICOM SEG cannot tell them apart")
    return sources


def write_dicom_seg(
    mask: np.ndarray,
    scan: Scan,
    label_names: Mapping[int, str],
    out_path: str | Path,
    model_name: str,
    sources: Sequence[pydicom.Dataset] | None = None,
) -> Path:
    """Write a mask of a DICOM series as a BINARY DICOM Segmentation referencing the series.

    Args:
        mask: Label ids of shape `scan.shape`, in the scan's (i, j, k) order.
        scan: The scan the mask was computed from; read from a DICOM series folder.
        label_names: Label id -> name of the labels to write; one segment each, numbered
            1..n in label-id order. Other ids in the mask are left out.
        out_path: The `.dcm` file to write (atomically).
        model_name: The model, named in each segment's algorithm identification.
        sources: `read_seg_sources(scan)` when already read.

    Returns:
        The path written.

    Raises:
        ScanError: The scan is not a DICOM series, the mask does not fit it, its slices
            cannot be read again, or the object cannot be made or written.
    """
    import highdicom as hd

    import medvit

    out_path = Path(out_path)
    sources = read_seg_sources(scan) if sources is None else sources
    if mask.shape != scan.shape or len(sources) != scan.shape[2]:
        raise ScanError.at(out_path, f"mask shape {mask.shape} does not match the series {scan.path} {scan.shape}")
    if not label_names:
        raise ScanError.at(out_path, "no labels to write")
    first = sources[0]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=_frames(mask, sorted(label_names)),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segment_descriptions(label_names, model_name),
            series_instance_uid=hd.UID(),
            series_number=1000 + int(getattr(first, "SeriesNumber", None) or 0),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medvit",
            manufacturer_model_name=model_name,
            software_versions=medvit.__version__,
            device_serial_number="1",
            content_label="MEDVIT",
            content_description=f"medvit {model_name} segmentation",
            series_description=f"medvit {model_name} segmentation",
        )
        return write_atomic(out_path, lambda tmp: seg.save_as(tmp))
    except (ValueError, TypeError, AttributeError, KeyError, OSError) as exc:
        raise ScanError.at(out_path, f"cannot write the DICOM SEG ({short_reason(exc)})") from None
