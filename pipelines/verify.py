"""Check a dataset before any work is spent on it, listing every problem at once.

What nnU-Net's ``verify_dataset_integrity`` checks (Isensee et al., Nature Methods 2021),
and more, for MSD and nnU-Net v2 ``dataset.json`` files and ``medvit preprocess`` folders:

- every listed file exists and is readable (:func:`medvit.pipelines.io.read_scan`);
- every image has as many channels as the dataset declares (one: medvit trains on
  single-channel images), so all cases agree with each other too;
- every label lies on its image's grid: same shape, affine equal within
  :data:`AFFINE_TOLERANCE_MM`;
- label values are whole numbers among the declared ids (0 and ``labels``; 0..K in a
  preprocessed folder);
- no NaN or infinite intensities, in images or labels;
- no case listed twice: the same image or label file in two cases, or two image files
  with identical content;
- warnings (training may go on): a label map with background only, an nnU-Net image
  file that belongs to no case, a ``numTraining`` that disagrees with the cases found.

Labels are read whole (their values must be looked at). Images are read whole only when
their voxels can be non-finite (floating point) or they are not NIfTI; an integer NIfTI
image gets every check `medvit.pipelines.nifti.check_nifti` makes without reading voxels
(header, geometry, and that the file holds the bytes its header declares).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvit.pipelines.datasets import DatasetSpec, load_dataset
from medvit.pipelines.errors import DatasetError, MedvitError, Problem, one_line, short_reason
from medvit.pipelines.io import NIFTI_SUFFIXES, read_scan
from medvit.pipelines.nifti import check_nifti

__all__ = [
    "AFFINE_TOLERANCE_MM", "DatasetProblems", "Problem", "format_problems", "verified_dataset", "verify_dataset",
]

# Largest difference allowed between an image's and its label's affine entries, in mm:
# float32 header storage and qform/sform round trips differ by far less; a real shift
# (a label saved from another crop or resampling) by far more.
AFFINE_TOLERANCE_MM = 1e-3
_MAX_LISTED_VALUES = 8


class DatasetProblems(DatasetError):
    """A dataset that failed verification; ``problems`` lists every problem found.

    ``str()`` is a one-line summary; ``details`` holds one line per problem, printed
    by the CLI above the summary.
    """

    def __init__(self, source: str | Path, problems: list[Problem], action: str = "nothing was done") -> None:
        self.problems = problems
        errors = [p for p in problems if not p.warning]
        files = len({p.file for p in errors})
        super().__init__(
            f"{source}: {len(errors)} problem{'s' if len(errors) != 1 else ''} in {files} "
            f"file{'s' if files != 1 else ''} (listed above); {action}"
        )
        self.details = format_problems([*errors, *(p for p in problems if p.warning)])


@dataclass
class _ImageInfo:
    shape: tuple[int, ...]
    affine: np.ndarray


def verify_dataset(data: str | Path | DatasetSpec, progress: bool = False) -> list[Problem]:
    """Check a dataset's files and list every problem found.

    Args:
        data: A ``dataset.json`` / ``medvit_preprocessed.json`` (or its folder), or an
            already loaded spec (then problems :func:`load_dataset` would collect, such
            as missing files, were already raised by it).
        progress: Show a progress bar over the cases.

    Returns:
        Problems in case order, each naming its file; empty for a clean dataset.
        Problems with ``warning`` set do not make a dataset unusable.
    """
    problems: list[Problem] = []
    if isinstance(data, DatasetSpec):
        spec = data
    else:
        try:
            spec = load_dataset(data, problems)
        except DatasetError as exc:
            return [exc.problem or Problem(Path(data), str(exc))]
    from tqdm.auto import tqdm

    expected = set(range(len(spec.labels) + 1)) if spec.remapped else {0, *spec.labels}
    problems.extend(_listed_twice(spec))
    images: dict[Path, str] = {}
    for case in tqdm(spec.cases, desc="verify", unit="case", disable=not progress):
        info = _check_image(case.image, problems)
        if info is not None:
            images[case.image] = case.name
        if case.label is not None:
            _check_label(case.label, info, expected, problems)
    problems.extend(_same_content(images))
    return problems


def verified_dataset(data: str | Path, action: str, progress: bool = False) -> tuple[DatasetSpec, list[Problem]]:
    """Verify a dataset and load it; refuse it with every problem listed.

    Args:
        data: As for :func:`load_dataset`.
        action: Said at the end of the refusal, such as ``"nothing was trained"``.
        progress: Show a progress bar over the cases.

    Returns:
        The dataset and its warnings.

    Raises:
        DatasetProblems: The dataset has at least one problem that is not a warning.
    """
    problems = verify_dataset(data, progress)
    if any(not p.warning for p in problems):
        raise DatasetProblems(data, problems, action)
    return load_dataset(data), problems


def _listed_twice(spec: DatasetSpec) -> list[Problem]:
    found = []
    for kind in ("image", "label"):
        owner: dict[Path, str] = {}
        for case in spec.cases:
            file = getattr(case, kind)
            if file is None:
                continue
            key = file.resolve()
            if key in owner:
                twice = f"listed twice: the {kind} of training cases {owner[key]!r} and {case.name!r}"
                found.append(Problem(file, twice))
            else:
                owner[key] = case.name
    for case in spec.cases:
        if case.label is not None and case.label.resolve() == case.image.resolve():
            found.append(Problem(case.label, f"is both the image and the label of training case {case.name!r}"))
    return found


def _same_content(images: dict[Path, str]) -> list[Problem]:
    """Image files with identical bytes; only files of equal size are hashed."""
    by_size: dict[int, list[Path]] = defaultdict(list)
    for path in images:
        by_size[path.stat().st_size].append(path)
    found = []
    for paths in by_size.values():
        if len(paths) < 2:
            continue
        seen: dict[str, Path] = {}
        for path in paths:
            if path.resolve() in {p.resolve() for p in seen.values()}:
                continue  # the same file listed twice is reported by _listed_twice
            digest = _digest(path)
            if digest in seen:
                other = seen[digest]
                found.append(Problem(
                    path, f"same content as {other} (training cases {images[other]!r} and {images[path]!r})"
                ))  # fmt: skip
            else:
                seen[digest] = path
    return found


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_image(path: Path, problems: list[Problem]) -> _ImageInfo | None:
    """Channels, readability and finiteness of an image; its grid when it is usable.

    An integer NIfTI image is judged by `check_nifti` (every header and size check, no
    voxel read): its voxels are finite whatever they hold. Others are read whole.
    """
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        try:
            info = check_nifti(path, one_volume=False)
        except MedvitError as exc:
            problems.append(_problem(path, exc))
            return None
        except OSError as exc:
            problems.append(Problem(path, f"cannot read ({exc.strerror or short_reason(exc)})"))
            return None
        shape = info.shape
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) < 3:
            problems.append(Problem(path, f"expected a 3D image, got shape {shape}"))
            return None
        channels = int(np.prod(shape[3:], dtype=np.int64))
        if channels != 1:
            problems.append(Problem(
                path, f"has {channels} channels (shape {shape}); the dataset declares 1 (single-channel images only)"
            ))  # fmt: skip
            return None
        if info.dtype.kind in "biu":
            return _ImageInfo(shape, info.affine)
    try:
        scan = read_scan(path)
    except MedvitError as exc:
        problems.append(_problem(path, exc))
        return None
    return _ImageInfo(scan.shape, scan.affine)


def _check_label(path: Path, image: _ImageInfo | None, expected: set[int], problems: list[Problem]) -> None:
    try:
        label = read_scan(path)
    except MedvitError as exc:
        problems.append(_problem(path, exc))
        return
    if image is not None:
        if label.shape != tuple(image.shape):
            problems.append(Problem(path, f"label shape {label.shape} differs from its image's {tuple(image.shape)}"))
        else:
            diff = float(np.abs(label.affine - image.affine).max())
            if diff > AFFINE_TOLERANCE_MM:
                problems.append(Problem(
                    path, f"label is not on its image's grid (affines differ by up to {diff:.3g} mm)"
                ))  # fmt: skip
    values = _label_values(label.array)
    if values is None:
        problems.append(Problem(path, "label holds non-integer values"))
        return
    unexpected = sorted(set(values) - expected)
    if unexpected:
        listed = ", ".join(str(v) for v in unexpected[:_MAX_LISTED_VALUES])
        more = f" and {len(unexpected) - _MAX_LISTED_VALUES} more" if len(unexpected) > _MAX_LISTED_VALUES else ""
        declared = ", ".join(str(v) for v in sorted(expected))
        problems.append(Problem(path, f"label values {listed}{more} are not declared labels ({declared})"))
    elif values == [0]:
        problems.append(Problem(path, "label map is empty (background only)", warning=True))


def _label_values(array: np.ndarray, chunk: int = 2**23) -> list[int] | None:
    """The distinct values of a label map; None when some are not whole numbers."""
    flat = array.reshape(-1)
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        # Counting is linear; np.unique sorts (seconds on a large CT label map).
        present = np.zeros(1 << (8 * array.dtype.itemsize), dtype=bool)
        for start in range(0, flat.size, chunk):
            present[flat[start : start + chunk]] = True
        return [int(v) for v in np.flatnonzero(present)]
    if array.dtype.kind == "f":
        if not np.array_equal(flat, np.round(flat)):
            return None
    return [int(v) for v in np.unique(flat)]


def _problem(path: Path, exc: MedvitError) -> Problem:
    """A read error as a problem; the reader's message already starts with the file."""
    text = one_line(str(exc))
    prefix = f"{path}: "
    return Problem(path, text[len(prefix):] if text.startswith(prefix) else text)


def format_problems(problems: Iterable[Problem]) -> list[str]:
    """One line per problem, warnings marked."""
    return [f"warning: {p}" if p.warning else str(p) for p in problems]
