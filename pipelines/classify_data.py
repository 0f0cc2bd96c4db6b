"""Classification data: a folder per class or a CSV, read into one `ClassificationSet`.

Sources:

- A class tree `root/<class>/<item>`: the folder names are the classes.
- A CSV with a header holding `path` (relative to the CSV's folder, or absolute), and
  optionally `label` (a class name) and `id`. Without `label` (or with it empty on every
  row) the set is for prediction: every label is None.

What an item is, and the kinds it can be (`ITEM_KINDS`):

| item | kinds |
| --- | --- |
| `.png .jpg .jpeg .bmp .tif .tiff` file (read by Pillow) | image |
| `.dcm .dicom .ima` file (one single-frame DICOM image) | image |
| `.nii` / `.nii.gz` with 2 dimensions (trailing singleton ones dropped) | image |
| `.nii` / `.nii.gz` with 3 dimensions, `.nrrd .nhdr .mha .mhd`, a DICOM series folder | volume |
| a folder of frame images (sorted by name) | video |
| `.npy` with 2 dimensions (H, W) | image |
| `.npy` with 3 dimensions: a clip (T, H, W) or a volume (D, H, W) | video, volume |
| `.npy` with 4 dimensions (T, H, W, C), C of 1, 3 or 4 | video |

The set's kind is the one kind every item can be: given as `kind`, every item must allow
it; inferred, the items must allow exactly one (3D `.npy` arrays alone are ambiguous and
need `kind`). Video files (`.mp4 .avi .mov .mkv`) are refused with the decoder
that is missing. Only headers are read here; `medvit.pipelines.classify_load` reads the voxels.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medvit.pipelines.classify_load import (
    FRAME_SUFFIXES,
    IMAGE_SUFFIXES,
    VIDEO_FILE_SUFFIXES,
    frame_files,
    load_item,
    normalise,
    video_decoder_problem,
)
from medvit.pipelines.errors import MedvitError, short_reason
from medvit.pipelines.io import NIFTI_SUFFIXES, SCAN_SUFFIXES, is_dicom_folder

__all__ = [
    "KINDS",
    "ClassificationDataset",
    "ClassificationSet",
    "Item",
    "check_trainable",
    "item_kinds",
    "load_item",
    "normalise",
    "read_classification_data",
]

KINDS = ("image", "volume", "video")
DICOM_FILE_SUFFIXES = (".dcm", ".dicom", ".ima")
_SHOWN = 3  # names listed in an error about several files


@dataclass(frozen=True)
class Item:
    """One example.

    Attributes:
        path: The file or folder.
        label: Index into `ClassificationSet.classes`; None when the source has no labels.
        id: A name unique in the set: the CSV's `id`, else its `path` as written, else the
            path relative to the class tree's root (`<class>/<item>`).
    """

    path: Path
    label: int | None
    id: str


@dataclass
class ClassificationSet:
    """Examples, the classes they are labelled with and what kind of input they are.

    Attributes:
        items: The examples, in source order (a class tree: by class, then by name).
        classes: Class names sorted (numerically when every name is an integer); a label is
            an index into this list. Empty for a CSV without labels.
        kind: `image`, `volume` or `video`.
        source: The folder or CSV read.
    """

    items: list[Item]
    classes: list[str]
    kind: str
    source: Path | None = field(default=None)

    @property
    def labelled(self) -> bool:
        """True when every item has a label."""
        return all(item.label is not None for item in self.items)


def _names(paths: Sequence[Path | str]) -> str:
    more = len(paths) - _SHOWN
    return ", ".join(str(p) for p in paths[:_SHOWN]) + (f" and {more} more" if more > 0 else "")


def _sorted_classes(names: Iterable[str]) -> list[str]:
    unique = set(names)
    if unique and all(re.fullmatch(r"[+-]?\d+", n) for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _visible(entries: Iterable[Path]) -> list[Path]:
    # Hidden entries are OS litter (.DS_Store) or medvit's own partial writes (.tmp-*).
    return sorted(p for p in entries if not p.name.startswith("."))


def _nifti_ndim(path: Path) -> int:
    import nibabel as nib

    try:
        shape = list(nib.load(str(path)).shape)
    except Exception as exc:
        raise MedvitError.at(path, f"not a readable NIfTI file ({short_reason(exc)})") from None
    while len(shape) > 2 and shape[-1] == 1:
        shape.pop()
    return len(shape)


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except Exception as exc:
        raise MedvitError.at(path, f"not a readable .npy array ({short_reason(exc)})") from None


def item_kinds(path: Path) -> frozenset[str]:
    """The kinds the item at `path` can be read as (the table in the module docstring).

    Raises:
        MedvitError: The item is of no known kind, or its header cannot be read.
    """
    lower = path.name.lower()
    if path.is_dir():
        if is_dicom_folder(path):
            return frozenset({"volume"})
        if frame_files(path):
            return frozenset({"video"})
        raise MedvitError.at(
            path, f"folder is neither a clip of frame images ({' '.join(FRAME_SUFFIXES)}) nor a DICOM series"
        )
    if lower.endswith(IMAGE_SUFFIXES) or lower.endswith(DICOM_FILE_SUFFIXES):
        return frozenset({"image"})
    if lower.endswith(NIFTI_SUFFIXES):
        ndim = _nifti_ndim(path)
        if ndim in (2, 3):
            return frozenset({"image" if ndim == 2 else "volume"})
        raise MedvitError.at(path, f"NIfTI with {ndim} dimensions (expected a 2D image or a 3D volume)")
    if lower.endswith(SCAN_SUFFIXES):
        return frozenset({"volume"})
    if lower.endswith(".npy"):
        shape = _npy_shape(path)
        if len(shape) == 2:
            return frozenset({"image"})
        if len(shape) == 3:
            return frozenset({"video", "volume"})
        if len(shape) == 4 and shape[-1] in (1, 3, 4):
            return frozenset({"video"})
        raise MedvitError.at(path, f"array of shape {shape} (expected (H,W), (T,H,W), (D,H,W) or (T,H,W,C))")
    if lower.endswith(VIDEO_FILE_SUFFIXES):
        raise MedvitError.at(path, video_decoder_problem(path))
    known = IMAGE_SUFFIXES + DICOM_FILE_SUFFIXES + SCAN_SUFFIXES + (".npy",) + VIDEO_FILE_SUFFIXES
    raise MedvitError.at(path, f"unknown file type (expected one of {' '.join(known)}, or a folder)")


def _set_kind(items: Sequence[Item], kind: str | None, source: Path) -> str:
    if kind is not None and kind not in KINDS:
        raise MedvitError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    allowed = {item.path: item_kinds(item.path) for item in items}
    if kind is not None:
        wrong = [p for p, kinds in allowed.items() if kind not in kinds]
        if wrong:
            got = " or ".join(sorted(allowed[wrong[0]]))
            raise MedvitError.at(wrong[0], f"is read as {got}, not {kind} ({len(wrong)} such item(s) in {source})")
        return kind
    common = set(KINDS).intersection(*allowed.values())
    if len(common) == 1:
        return common.pop()
    if common:
        raise MedvitError.at(
            source, f"items can be read as {' or '.join(sorted(common))}: say which kind (3D .npy arrays are ambiguous)"
        )
    first: dict[str, Path] = {}
    for path, kinds in allowed.items():
        first.setdefault("/".join(sorted(kinds)), path)
    mixed = ", ".join(f"{p} ({k})" for k, p in list(first.items())[:_SHOWN])
    raise MedvitError.at(source, f"items of different kinds: {mixed}")


def _check_readable(paths: Sequence[Path], source: Path) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise MedvitError.at(source, f"{len(missing)} item(s) not found: {_names(missing)}")
    unreadable = [p for p in paths if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0))]
    if unreadable:
        raise MedvitError.at(source, f"{len(unreadable)} item(s) cannot be read (permissions): {_names(unreadable)}")


def _read_tree(root: Path) -> tuple[list[Item], list[str]]:
    try:
        entries = _visible(root.iterdir())
    except OSError as exc:
        raise MedvitError.at(root, f"cannot list folder ({exc.strerror or short_reason(exc)})") from None
    stray = [p.name for p in entries if not p.is_dir()]
    if stray:
        raise MedvitError.at(root, f"files beside the class folders (expected <root>/<class>/<item>): {_names(stray)}")
    if not entries:
        raise MedvitError.at(root, "no class folders (expected <root>/<class>/<item>)")
    classes = _sorted_classes(p.name for p in entries)
    items: list[Item] = []
    empty = []
    for label, name in enumerate(classes):
        try:
            members = _visible((root / name).iterdir())
        except OSError as exc:
            raise MedvitError.at(root / name, f"cannot list folder ({exc.strerror or short_reason(exc)})") from None
        if not members:
            empty.append(name)
        items += [Item(path=p, label=label, id=f"{name}/{p.name}") for p in members]
    if empty:
        raise MedvitError.at(root, f"{len(empty)} empty class folder(s): {_names(empty)}")
    return items, classes


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{h.strip(): (v or "").strip() for h, v in row.items() if h is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedvitError.at(path, f"cannot read CSV ({short_reason(exc)})") from None
    return header, rows


def _read_csv(path: Path) -> tuple[list[Item], list[str]]:
    header, rows = _read_rows(path)
    if "path" not in header:
        raise MedvitError.at(path, f"no 'path' column (header: {', '.join(header) or 'empty'})")
    if not rows:
        raise MedvitError.at(path, "no rows under the header")
    blank = [str(n) for n, row in enumerate(rows, start=2) if not row.get("path")]
    if blank:
        raise MedvitError.at(path, f"empty path on line(s) {_names(blank)}")
    labels = [row.get("label", "") for row in rows]
    labelled = any(labels)
    if labelled and not all(labels):
        lines = [str(n) for n, lab in enumerate(labels, start=2) if not lab]
        raise MedvitError.at(path, f"empty label on line(s) {_names(lines)} (label every row, or none for prediction)")
    classes = _sorted_classes(labels) if labelled else []
    index = {name: i for i, name in enumerate(classes)}
    items = [
        Item(
            path=path.parent / row["path"],
            label=index[row["label"]] if labelled else None,
            id=row.get("id") or row["path"],
        )
        for row in rows
    ]
    return items, classes


def read_classification_data(source: str | Path, kind: str | None = None) -> ClassificationSet:
    """Read a class tree or a CSV into a `ClassificationSet` (headers only, no voxels).

    Args:
        source: A folder `root/<class>/<item>`, or a CSV with `path` and optionally `label`, `id`.
        kind: `image`, `volume` or `video`; None infers it (see the module docstring).

    Raises:
        MedvitError: The source is missing or not a folder/CSV; a class folder is empty; a CSV
            has no `path` column, no rows, some rows unlabelled or duplicate ids; items are
            missing or unreadable (up to three named); an item is of an unknown type; the
            items' kinds differ, or are ambiguous without `kind`.
    """
    source = Path(source)
    if not source.exists():
        raise MedvitError.at(source, "no such file or folder")
    if source.is_dir():
        items, classes = _read_tree(source)
    elif source.suffix.lower() == ".csv":
        items, classes = _read_csv(source)
    else:
        raise MedvitError.at(source, "expected a folder with one sub-folder per class, or a .csv file")
    counts = Counter(item.id for item in items)
    duplicates = [name for name, n in counts.items() if n > 1]
    if duplicates:
        raise MedvitError.at(source, f"duplicate ids: {_names(duplicates)}")
    _check_readable([item.path for item in items], source)
    return ClassificationSet(items=items, classes=classes, kind=_set_kind(items, kind, source), source=source)


def check_trainable(data: ClassificationSet) -> None:
    """Refuse a set training cannot use: unlabelled, or fewer than two classes with examples.

    Raises:
        MedvitError: Naming the source and the problem.
    """
    where = data.source or Path("classification data")
    if not data.items or not data.labelled:
        raise MedvitError.at(where, "has no labels (a CSV needs a 'label' column to train on)")
    present = {item.label for item in data.items}
    if len(present) < 2:
        names = [data.classes[i] for i in sorted(present)]  # type: ignore[index]
        raise MedvitError.at(where, f"needs at least 2 classes to train on, found {len(names)}: {_names(names)}")


class ClassificationDataset(Dataset):
    """Tensors of a `ClassificationSet`, as training and prediction both see them.

    An item is loaded (`load_item`: intensities scaled to 0..1, channels, size), then given to
    `transform` (augmentation, on the 0..1 tensor), then `normalise`d: `(x - 0.5) / 0.5`.

    Args:
        data: The set.
        size: Output spatial size: (H, W) for images and video frames, (D, H, W) for volumes.
        in_chans: Channels the model takes.
        frames: Frames sampled from each clip (video); None keeps every frame.
        transform: Applied to each loaded tensor before `normalise`.
        cache: Keep loaded tensors (before `transform`) in memory; per worker process.
        intensity: The intensity rule of `load_item`.
        normalise: Apply `normalise` after `transform`; False when `transform` normalises
            itself (so that random erasing fills with noise of the normalised scale).
    """

    def __init__(
        self,
        data: ClassificationSet,
        size: Sequence[int],
        in_chans: int,
        frames: int | None = None,
        transform=None,
        cache: bool = False,
        intensity: str = "auto",
        normalise: bool = True,
    ) -> None:
        self.data = data
        self.normalise = normalise
        self.size = tuple(int(s) for s in size)
        self.in_chans = int(in_chans)
        self.frames = frames
        self.transform = transform
        self.intensity = intensity
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.data.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.data.items[index]
        x = self._cache.get(index) if self._cache is not None else None
        if x is None:
            x = load_item(item.path, self.data.kind, self.size, self.in_chans, self.frames, self.intensity)
            if self._cache is not None:
                self._cache[index] = x
        x = x.clone() if self._cache is not None else x
        if self.transform is not None:
            x = self.transform(x)
        return (normalise(x) if self.normalise else x), (-1 if item.label is None else int(item.label))
