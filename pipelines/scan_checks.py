"""Checks that a scan's header can be trusted, made before any voxel is read.

A damaged or hostile header must end in a one-line :class:`ScanError`, never in a
numpy/zlib traceback, a multi-gigabyte allocation, or a result on a grid that is not the
patient's. The readers in :mod:`medvit.pipelines.io` call these on what the header
declares (shape, voxel type, geometry, where the voxel bytes are) and only then read.
"""

from __future__ import annotations

import gzip
import os
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medvit.pipelines.errors import ScanError, short_reason

__all__ = [
    "MAX_VOXELS",
    "check_deflate_bound",
    "check_grid",
    "check_metaimage_numbers",
    "check_payload",
    "check_spacing",
    "check_voxel_budget",
    "check_voxel_type",
    "itk_payload",
    "squeeze_to_3d",
]

# 4 Gi voxels: a 2048 x 2048 x 1024 micro-CT still fits; a header beyond it is damaged.
MAX_VOXELS = 1 << 32
# Deflate cannot compress better than about 1032:1, so a gzip file of n bytes never
# holds more than that many bytes of data: a bigger claim is refused before reading.
_DEFLATE_MAX_RATIO = 1032
_DEFLATE_SLACK = 1 << 16
# Voxel sizes outside this range (mm) are damaged headers or wrong units, not scanners.
_MIN_SPACING, _MAX_SPACING = 1e-4, 1e4
# |det| of the unit-column matrix: 1 for orthogonal axes, 0 when two axes coincide.
_MIN_AXIS_INDEPENDENCE = 1e-6
# float32 header fields: an orthonormal matrix stored there is only this exact.
_ORTHONORMAL_TOL = 1e-4
_READ_CHUNK = 1 << 24
_SUPPORTED_VOXEL_TYPES = tuple(
    np.dtype(t)
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
              np.float16, np.float32, np.float64)
)  # fmt: skip


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + (",)" if len(shape) == 1 else ")")


def squeeze_to_3d(path: Path, shape: Sequence[int]) -> tuple[int, int, int]:
    """The 3D shape of an image whose extra dimensions are all singleton.

    ``(x, y, z, 1)`` and ``(x, y, z, 1, 1)`` are one 3D volume; ``(x, y, 1)`` is a 3D volume
    of one slice. A 2D image ``(x, y)``, several volumes, vector-valued voxels and empty
    axes are refused.

    Raises:
        ScanError: The shape is not one 3D volume.
    """
    dims = [int(d) for d in shape]
    if any(d <= 0 for d in dims):
        raise ScanError.at(path, f"has no voxels (shape {_shape_text(dims)})")
    if len(dims) < 3:
        raise ScanError.at(path, f"expected a 3D image, got shape {_shape_text(dims)} (a 2D image)")
    extra = dims[3:]
    if any(d != 1 for d in extra):
        volumes = int(np.prod(extra, dtype=np.float64))
        raise ScanError.at(
            path, f"expected a 3D image, got shape {_shape_text(dims)} ({volumes} volumes or components per voxel)"
        )
    return (dims[0], dims[1], dims[2])


def check_voxel_type(path: Path, dtype: np.dtype, described: str | None = None) -> None:
    """Refuse complex, RGB/RGBA, structured, bool and extended-precision voxels."""
    dtype = np.dtype(dtype)
    if dtype.fields is None and dtype.newbyteorder("=") in _SUPPORTED_VOXEL_TYPES:
        return
    name = described or ("RGB/structured " + str(dtype) if dtype.fields else str(dtype))
    raise ScanError.at(path, f"unsupported voxel type {name} (expected a single-channel integer or float image)")


def _memory_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's own limit (cgroup v2), when it has one
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total)


def check_voxel_budget(path: Path, shape: Sequence[int], bytes_per_voxel: int, dtype_name: str) -> int:
    """Refuse a shape that is implausible or that would not fit in memory; return its byte size.

    Args:
        path: For the message.
        shape: All dimensions the header declares (singletons included).
        bytes_per_voxel: What reading costs per voxel (the file's item size plus any
            conversion the reader makes).
        dtype_name: For the message.
    """
    voxels = int(np.prod([int(d) for d in shape], dtype=object))
    needed = voxels * int(bytes_per_voxel)
    if voxels > MAX_VOXELS:
        raise ScanError.at(
            path, f"header declares an implausible size {_shape_text(shape)} ({voxels:,} voxels; at most {MAX_VOXELS:,})"
        )
    memory = _memory_bytes()
    if needed > memory:
        raise ScanError.at(
            path,
            f"header declares {_shape_text(shape)} voxels of {dtype_name} ({_human_bytes(needed)}), "
            f"more than the {_human_bytes(memory)} of memory on this machine",
        )
    return needed


def check_grid(path: Path, matrix: np.ndarray, origin: np.ndarray, what: str, orthonormal: bool = False) -> None:
    """Refuse a voxel-to-world matrix that is non-finite, singular or of implausible scale.

    Args:
        path: For the message.
        matrix: 3x3 matrix whose columns are the voxel axes in mm (direction x spacing).
        origin: World position of voxel (0, 0, 0).
        what: Which header record this is (``"sform"``, ``"direction"``...), for the message.
        orthonormal: Also require orthogonal axes (ITK grids: NIfTI writers refuse others).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    origin = np.asarray(origin, dtype=np.float64)
    if not (np.all(np.isfinite(matrix)) and np.all(np.isfinite(origin))):
        raise ScanError.at(path, f"the {what} holds NaN or infinite values")
    norms = np.linalg.norm(matrix, axis=0)
    if np.any(norms == 0):
        raise ScanError.at(path, f"the {what} is singular (voxel axis {int(np.argmin(norms))} has zero length)")
    if np.any(norms < _MIN_SPACING) or np.any(norms > _MAX_SPACING):
        sizes = ", ".join(f"{n:.3g}" for n in norms)
        raise ScanError.at(path, f"the {what} gives implausible voxel sizes ({sizes} mm)")
    unit = matrix / norms
    if abs(float(np.linalg.det(unit))) < _MIN_AXIS_INDEPENDENCE:
        raise ScanError.at(path, f"the {what} is singular (two voxel axes point the same way)")
    if orthonormal and not np.allclose(unit.T @ unit, np.eye(3), atol=_ORTHONORMAL_TOL):
        raise ScanError.at(path, f"the {what} is not orthogonal (a sheared grid)")


def check_spacing(path: Path, spacing: Sequence[float], what: str = "spacing") -> None:
    """Refuse zero, negative, non-finite or implausible voxel sizes."""
    values = np.asarray(spacing, dtype=np.float64)
    text = ", ".join(f"{v:g}" for v in values)
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ScanError.at(path, f"invalid voxel {what} ({text}): must be finite and positive")
    if np.any(values < _MIN_SPACING) or np.any(values > _MAX_SPACING):
        raise ScanError.at(path, f"implausible voxel {what} ({text} mm)")


def check_payload(path: Path, offset: int, nbytes: int, compressed: bool, header: Path | None = None) -> None:
    """Refuse a file that cannot hold the `nbytes` of voxels its header declares at `offset`.

    `header` is the file the user named, when the voxels are in another file (its data
    file); messages name it.

    Uncompressed: a size comparison. Gzip: a claim beyond deflate's best ratio is refused
    at once; otherwise the gzip trailer's length is compared and, where it does not settle
    the question (several gzip members, data past the image, or a damaged file), the
    stream is decompressed in chunks and counted, never allocated in one piece.
    """
    size = path.stat().st_size
    needed = int(offset) + int(nbytes)
    if not compressed:
        if size < needed:
            raise ScanError.at(
                header or path,
                f"truncated: the header declares {needed:,} bytes (voxels from byte {int(offset)}), "
                f"{'its data file ' + path.name if header else 'the file'} holds {size:,}",
            )
        return
    check_deflate_bound(path, size, needed)
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        (trailer,) = struct.unpack("<I", fh.read(4))
    if trailer == needed % (1 << 32):
        return
    got = 0
    try:
        with gzip.open(path, "rb") as gz:
            while got < needed:
                chunk = gz.read(min(_READ_CHUNK, needed - got))
                if not chunk:
                    break
                got += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        if got < needed:
            raise ScanError.at(
                path,
                f"truncated or damaged gzip data before the {needed:,} bytes the header declares ({short_reason(exc)})",
            ) from None
    if got < needed:
        raise ScanError.at(path, f"truncated: the header declares {needed:,} bytes, the gzip data holds {got:,}")


def check_deflate_bound(path: Path, compressed_bytes: int, nbytes: int) -> None:
    """Refuse `nbytes` of data claimed from `compressed_bytes` of deflate stream: more than it can hold."""
    if nbytes > max(compressed_bytes, 0) * _DEFLATE_MAX_RATIO + _DEFLATE_SLACK:
        raise ScanError.at(
            path,
            f"truncated or damaged: {compressed_bytes:,} bytes of compressed data cannot hold "
            f"the {nbytes:,} bytes the header declares",
        )


# Text headers of NRRD and MetaImage: what is needed to know where the voxels are.
_NRRD_FIELD = re.compile(r"^([^:#][^:]*):=?\s*(.*)$")
_META_FIELD = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$")
_MAX_TEXT_HEADER = 1 << 20


def _text_header(path: Path) -> tuple[list[str], int] | None:
    """Header lines and the byte offset after them, up to a blank line (NRRD) or ElementDataFile (MHA)."""
    with open(path, "rb") as fh:
        head = fh.read(_MAX_TEXT_HEADER)
    lines, pos = [], 0
    while pos < len(head):
        end = head.find(b"\n", pos)
        if end < 0:
            return None
        line = head[pos:end].decode("latin-1").rstrip("\r")
        pos = end + 1
        if not line.strip():
            return lines, pos
        lines.append(line)
        if line.strip().lower().startswith("elementdatafile"):
            return lines, pos
    return None


def itk_payload(path: Path, kind: str) -> tuple[Path, int, bool] | None:
    """Where an NRRD or MetaImage file keeps its voxels: (file, offset, gzip-compressed).

    None when the layout cannot be checked cheaply (ASCII or bzip2 encodings, lists of
    data files, header skips counted in lines); ITK's own reader then has the last word.
    """
    parsed = _text_header(path)
    if parsed is None:
        return None
    lines, data_start = parsed
    fields: dict[str, str] = {}
    pattern = _NRRD_FIELD if kind == "NRRD" else _META_FIELD
    for line in lines[1:] if kind == "NRRD" else lines:
        m = pattern.match(line)
        if m:
            fields[m.group(1).strip().lower()] = m.group(2).strip()
    if kind == "NRRD":
        encoding = fields.get("encoding", "raw").lower()
        if encoding not in ("raw", "gzip", "gz"):
            return None
        if "line skip" in fields or "lineskip" in fields:
            return None
        detached = fields.get("data file", fields.get("datafile"))
        skip = fields.get("byte skip", fields.get("byteskip", "0"))
        compressed = encoding != "raw"
    else:
        detached = fields.get("elementdatafile")
        if detached is None:
            return None
        if detached.upper() == "LOCAL":
            detached = None
        skip = fields.get("headersize", "0")
        compressed = fields.get("compresseddata", "false").lower() == "true"
    try:
        skip_bytes = int(skip)
    except ValueError:
        return None
    if skip_bytes < 0 or (detached is not None and (" " in detached or "%" in detached or detached.upper() == "LIST")):
        return None  # "skip to the end" and file lists are left to ITK
    if detached is None:
        return path, data_start + skip_bytes, compressed
    data_file = Path(detached) if Path(detached).is_absolute() else path.parent / detached
    if not data_file.is_file():
        raise ScanError.at(path, f"its data file {detached} is missing")
    return data_file, skip_bytes, compressed


_META_GEOMETRY_KEYS = ("offset", "origin", "position", "elementspacing", "elementsize", "transformmatrix",
                       "rotation", "orientation")  # fmt: skip


def check_metaimage_numbers(path: Path) -> None:
    """Refuse a MetaImage header whose geometry fields are not finite numbers.

    ITK's MetaIO reads ``nan`` (and any word) in ``Offset`` as 0, which would silently
    move the scan to the world origin.
    """
    parsed = _text_header(path)
    if parsed is None:
        return
    for line in parsed[0]:
        m = _META_FIELD.match(line)
        if not m or m.group(1).lower() not in _META_GEOMETRY_KEYS:
            continue
        try:
            values = [float(v) for v in m.group(2).split()]
        except ValueError:
            values = [float("nan")]
        if not all(np.isfinite(values)):
            raise ScanError.at(path, f"the header's {m.group(1)} holds NaN, infinite or non-numeric values ({m.group(2)})")
