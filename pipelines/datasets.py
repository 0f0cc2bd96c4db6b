"""Datasets on disk: the MSD, nnU-Net v2 and medvit-preprocessed layouts, read into one spec.

Three layouts are recognised by :func:`load_dataset`:

- ``msd``: a Medical Segmentation Decathlon ``dataset.json`` with ``labels`` mapping
  id -> name, ``training`` listing image/label pairs (paths relative to the json's
  folder) and ``modality``.
- ``nnunet``: an nnU-Net v2 ``dataset.json`` with ``labels`` mapping name -> id,
  ``channel_names`` and ``file_ending``; cases are the files
  ``imagesTr/<case>_0000<file_ending>`` with ``labelsTr/<case><file_ending>``.
- ``preprocessed``: a folder written by
  :func:`medvit.pipelines.dataset_preprocessing.preprocess_dataset`, recognised by its
  ``medvit_preprocessed.json``.

Every problem with a dataset a user can cause raises :class:`DatasetError` with one
line naming the file and what is wrong. Given a list to collect into, :func:`load_dataset`
instead lists every problem with single cases there (as :class:`~medvit.pipelines.errors.Problem`) and carries on,
which is what :mod:`medvit.pipelines.verify` builds on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvit.pipelines.errors import DatasetError, Problem, ScanError, one_line
from medvit.pipelines.io import SCAN_SUFFIXES, Scan, read_scan

__all__ = ["DATASET_JSON", "PREPROCESSED_JSON", "Case", "DatasetSpec", "load_dataset", "read_case"]

DATASET_JSON = "dataset.json"
PREPROCESSED_JSON = "medvit_preprocessed.json"

_MR_NAMES = {"MR", "MRI", "T1", "T1W", "T1C", "T1GD", "T1CE", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD"}


@dataclass
class Case:
    """One training case.

    Attributes:
        name: Case identifier, unique within the dataset (also the output file stem).
        image: The image file.
        label: The label file (None for unlabelled cases).
    """

    name: str
    image: Path
    label: Path | None


@dataclass
class DatasetSpec:
    """A dataset as the pipelines see it, whatever its layout on disk.

    For a ``preprocessed`` folder the volumes on disk are already reoriented, resampled
    and normalised with ``preprocessing``, and the label files already hold the
    contiguous class indices 0..K, class ``c`` being ``label_ids[c - 1]``; ``remapped``
    is then True. ``labels`` keeps the source's original ids in every layout, so names
    and ids mean the same before and after preprocessing. A trainer given a spec with
    ``remapped`` set must skip the label remapping and the resampling (and the
    intensity normalisation) and only load the volumes; otherwise it runs
    ``preprocess_transforms`` with ``label_ids``.

    Attributes:
        root: Folder holding the dataset's json.
        name: Dataset name.
        labels: Original label id -> name, background (0) excluded.
        cases: Training cases, each with a label file.
        modality: ``"CT"``, ``"MR"`` or the name the dataset gives its channel.
        layout: ``"msd"``, ``"nnunet"`` or ``"preprocessed"``.
        preprocessing: For a preprocessed folder, the ``Preprocessing.to_dict()`` applied.
        remapped: True when the label files hold class indices 0..K rather than the
            original ids (a preprocessed folder).
    """

    root: Path
    name: str
    labels: dict[int, str]
    cases: list[Case]
    modality: str
    layout: str
    preprocessing: dict | None = None
    remapped: bool = False

    @property
    def label_ids(self) -> list[int]:
        """Original label ids in class order: class ``c`` (1..K) is ``label_ids[c - 1]``."""
        return sorted(self.labels)

    @property
    def class_names(self) -> list[str]:
        """Names of classes 1..K, in class order (background excluded)."""
        return [self.labels[i] for i in self.label_ids]



def _report(sink: list[Problem] | None, path: str | Path, problem: str, warning: bool = False) -> None:
    """Raise the problem, or add it to ``sink`` when collecting them."""
    if sink is None:
        if warning:
            return
        raise DatasetError.at(path, problem)
    sink.append(Problem(Path(path), one_line(problem), warning))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError.at(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError.at(path, f"cannot read file ({one_line(str(exc))})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError.at(path, f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise DatasetError.at(path, f"expected a JSON object at the top level, got {type(data).__name__}")
    return data


def load_dataset(path: str | Path, problems: list[Problem] | None = None) -> DatasetSpec:
    """Read a dataset in MSD, nnU-Net v2 or medvit-preprocessed layout.

    The layout is told by the json: a folder (or file) with ``medvit_preprocessed.json``
    is ``preprocessed``; a ``dataset.json`` whose ``labels`` map id strings to names is
    ``msd``; one whose ``labels`` map names to integer ids is ``nnunet``. Label ids need
    not be contiguous.

    Args:
        path: A ``dataset.json`` (or ``medvit_preprocessed.json``) file, or a folder
            holding one.
        problems: When given, problems with single cases (a missing file, a case with
            several channel files, a name used twice, an image file that belongs to no
            case, a ``numTraining`` that disagrees) are appended here instead of raised;
            cases whose files are missing or whose name is unusable are left out. The
            json's own problems still raise.

    Returns:
        The dataset; every listed image and label file exists.

    Raises:
        DatasetError: The path or json is missing or invalid, labels are missing or
            malformed (or nnU-Net regions), there are no training cases, a case has
            several channels, or a listed file does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError.at(path, "no such file or folder")
    if path.is_dir():
        if (path / PREPROCESSED_JSON).is_file():
            path = path / PREPROCESSED_JSON
        elif (path / DATASET_JSON).is_file():
            path = path / DATASET_JSON
        else:
            raise DatasetError.at(path, f"no {DATASET_JSON} (or {PREPROCESSED_JSON}) in this folder")
    data = _read_json(path)
    if path.name == PREPROCESSED_JSON:
        return _load_preprocessed(path, data, problems)
    if "labels" not in data:
        raise DatasetError.at(path, "no 'labels' entry (label ids and names)")
    labels = data["labels"]
    if not isinstance(labels, dict) or not labels:
        raise DatasetError.at(path, "'labels' must be a non-empty object of label ids and names")
    if all(isinstance(v, str) for v in labels.values()):
        return _load_msd(path, data, problems)
    if all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in labels.values()):
        return _load_nnunet(path, data, problems)
    raise DatasetError.at(
        path,
        "'labels' must map ids to names (MSD, {\"1\": \"liver\"}) or names to ids (nnU-Net v2, {\"liver\": 1})",
    )


def _label_id(path: Path, value: Any, name: Any) -> int:
    try:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        lid = int(value)
    except (TypeError, ValueError):
        raise DatasetError.at(path, f"label {name!r} has id {value!r}; ids must be whole numbers") from None
    if lid < 0:
        raise DatasetError.at(path, f"label {name!r} has negative id {lid}")
    return lid


def _check_labels(path: Path, labels: dict[int, str]) -> dict[int, str]:
    if not labels:
        raise DatasetError.at(path, "'labels' has no foreground label (only background, id 0)")
    return dict(sorted(labels.items()))


def _modality(path: Path, entry: Any, key: str) -> str:
    if entry is None:
        return "CT"
    if isinstance(entry, str):
        names = [entry]
    elif isinstance(entry, dict):
        names = [str(v) for v in entry.values()]
    elif isinstance(entry, list):
        names = [str(v) for v in entry]
    else:
        raise DatasetError.at(path, f"'{key}' must be an object of channel names, got {type(entry).__name__}")
    if len(names) > 1:
        listed = ", ".join(names)
        raise DatasetError.at(
            path, f"'{key}' lists {len(names)} channels ({listed}); only single-channel images are supported"
        )
    if not names:
        return "CT"
    name = names[0].strip()
    if name.upper() == "CT":
        return "CT"
    if name.upper() in _MR_NAMES:
        return "MR"
    return name or "CT"


def _case_name(image: Path) -> str:
    name = image.name
    for suffix in sorted((*SCAN_SUFFIXES, ".gz"), key=len, reverse=True):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _check_cases(path: Path, cases: list[Case], sink: list[Problem] | None = None) -> list[Case]:
    if not cases:
        raise DatasetError.at(path, "no training cases")
    seen: dict[str, Path] = {}
    kept = []
    for case in cases:
        # Case names become output file names: keep them inside the output folders.
        if not case.name or case.name.startswith(".") or "/" in case.name or "\\" in case.name:
            _report(sink, path, f"training case name {case.name!r} cannot be used as a file name")
            continue
        if case.name in seen:
            _report(sink, path, f"two training cases share the name {case.name!r} ({seen[case.name]} and {case.image})")
            continue
        seen[case.name] = case.image
        missing = False
        for kind, file in (("image", case.image), ("label", case.label)):
            if file is not None and not file.exists():
                _report(sink, file, f"{kind} of training case {case.name!r} does not exist (dataset {path})")
                missing = True
        if not missing:
            kept.append(case)
    return kept


def _check_count(path: Path, data: dict[str, Any], found: int, sink: list[Problem] | None) -> None:
    declared = data.get("numTraining")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared != found:
        _report(sink, path, f"'numTraining' is {declared} but {found} training cases were found", warning=True)


def _spec(
    path: Path, data: dict[str, Any], layout: str, labels: dict[int, str], cases: list[Case], modality: str,
    **extra: Any,
) -> DatasetSpec:
    """The spec of the dataset whose json is `path`, named by the json or else by its folder."""
    root = path.parent
    name = str(data.get("name") or root.name)
    return DatasetSpec(root=root, name=name, labels=labels, cases=cases, modality=modality, layout=layout, **extra)


def _load_msd(path: Path, data: dict[str, Any], sink: list[Problem] | None = None) -> DatasetSpec:
    labels: dict[int, str] = {}
    for key, name in data["labels"].items():
        lid = _label_id(path, key, name)
        if lid != 0:
            labels[lid] = name
    labels = _check_labels(path, labels)
    training = data.get("training")
    if training is None or training == []:
        raise DatasetError.at(path, "no training cases ('training' is missing or empty)")
    if not isinstance(training, list):
        raise DatasetError.at(path, f"'training' must be a list of image/label pairs, got {type(training).__name__}")
    root = path.parent
    cases = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict):
            raise DatasetError.at(
                path, f"training case {index} must be an object with 'image' and 'label', got {entry!r}"
            )
        image, label = entry.get("image"), entry.get("label")
        if not isinstance(image, str) or not image:
            raise DatasetError.at(path, f"training case {index} has no 'image' path")
        if not isinstance(label, str) or not label:
            raise DatasetError.at(path, f"training case {index} ({image}) has no 'label' path")
        image_path = root / image
        cases.append(Case(name=_case_name(image_path), image=image_path, label=root / label))
    _check_count(path, data, len(cases), sink)
    cases = _check_cases(path, cases, sink)
    return _spec(path, data, "msd", labels, cases, _modality(path, data.get("modality"), "modality"))


def _load_nnunet(path: Path, data: dict[str, Any], sink: list[Problem] | None = None) -> DatasetSpec:
    labels: dict[int, str] = {}
    for name, value in data["labels"].items():
        if isinstance(value, list):
            raise DatasetError.at(
                path, f"label {name!r} is a region ({value}); region-based nnU-Net labels are not supported"
            )
        if name == "ignore":
            raise DatasetError.at(
                path, "label 'ignore' (nnU-Net sparse annotation) is not supported; every voxel must be labelled"
            )
        lid = _label_id(path, value, name)
        if lid in labels:
            raise DatasetError.at(path, f"labels {labels[lid]!r} and {name!r} share the id {lid}")
        if lid != 0:
            labels[lid] = str(name)
    labels = _check_labels(path, labels)
    channels = data.get("channel_names", data.get("modality"))
    modality = _modality(path, channels, "channel_names" if "channel_names" in data else "modality")
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise DatasetError.at(path, f"'file_ending' must be a suffix such as \".nii.gz\", got {ending!r}")
    root = path.parent
    if "dataset" in data:
        cases = _nnunet_listed_cases(path, data["dataset"], sink)
    else:
        cases = _nnunet_found_cases(path, root, ending, sink)
    _check_count(path, data, len(cases), sink)
    return _spec(path, data, "nnunet", labels, _check_cases(path, cases, sink), modality)


def _nnunet_found_cases(path: Path, root: Path, ending: str, sink: list[Problem] | None = None) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError.at(images_dir, f"folder of training images for {path} does not exist")
    files = sorted(p for p in images_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("."))
    stems = [p.name[: -len(ending)] for p in files]
    cases = []
    for stem, image in zip(stems, files):
        if stem[-5:-4] == "_" and stem[-4:].isdigit() and not stem.endswith("_0000"):
            _report(
                sink, image,
                f"image channel {stem[-4:]} of case {stem[:-5]!r}; the dataset declares 1 channel and only "
                "single-channel (_0000) nnU-Net datasets are supported",
            )  # fmt: skip
            continue
        if not stem.endswith("_0000"):
            _report(sink, image, f"not named <case>_0000{ending}, so it belongs to no training case", warning=True)
            continue
        name = stem[: -len("_0000")]
        cases.append(Case(name=name, image=image, label=labels_dir / f"{name}{ending}"))
    if not cases:
        raise DatasetError.at(path, f"no training cases (no imagesTr/<case>_0000{ending} files in {images_dir})")
    return cases


def _nnunet_listed_cases(path: Path, listed: Any, sink: list[Problem] | None = None) -> list[Case]:
    if not isinstance(listed, dict):
        raise DatasetError.at(path, f"'dataset' must map case names to their files, got {type(listed).__name__}")
    cases = []
    for name, entry in listed.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not images or not isinstance(label, str):
            raise DatasetError.at(path, f"case {name!r} in 'dataset' needs 'images' (a list) and 'label'")
        if len(images) != 1:
            _report(sink, path, f"case {name!r} has {len(images)} image channels; only single-channel is supported")
        cases.append(Case(name=str(name), image=path.parent / images[0], label=path.parent / label))
    return cases


def _load_preprocessed(path: Path, data: dict[str, Any], sink: list[Problem] | None = None) -> DatasetSpec:
    root = path.parent
    for key in ("labels", "cases", "preprocessing"):
        if key not in data:
            raise DatasetError.at(path, f"no {key!r} entry; not a complete medvit preprocessed folder")
    raw = data["labels"]
    if not isinstance(raw, dict) or not raw:
        raise DatasetError.at(path, "'labels' must map class indices to {\"id\", \"name\"}")
    by_class: dict[int, tuple[int, str]] = {}
    for key, entry in raw.items():
        cls = _label_id(path, key, key)
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("name"), str):
            raise DatasetError.at(
                path, f"class {key} must be {{\"id\": <original id>, \"name\": <name>}}, got {entry!r}"
            )
        by_class[cls] = (_label_id(path, entry["id"], entry["name"]), entry["name"])
    classes = sorted(by_class)
    ids = [by_class[c][0] for c in classes]
    # Class c must be the c-th smallest original id, the order preprocess_transforms remaps to.
    if classes != list(range(1, len(classes) + 1)) or ids != sorted(set(ids)) or 0 in ids:
        raise DatasetError.at(
            path, f"class indices {classes} with ids {ids} are not the remapping 1..K of the sorted ids"
        )
    labels = {lid: name for lid, name in by_class.values()}
    if not isinstance(data["cases"], list):
        raise DatasetError.at(path, "'cases' must be a list")
    cases = []
    for index, entry in enumerate(data["cases"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "image", "label")):
            raise DatasetError.at(path, f"case {index} must have 'name', 'image' and 'label'")
        cases.append(Case(name=entry["name"], image=root / entry["image"], label=root / entry["label"]))
    preprocessing = data["preprocessing"]
    if not isinstance(preprocessing, dict):
        raise DatasetError.at(path, "'preprocessing' must be an object")
    cases = _check_cases(path, cases, sink)
    modality = str(data.get("modality") or "CT")
    return _spec(path, data, "preprocessed", labels, cases, modality, preprocessing=preprocessing, remapped=True)


def _read(path: Path) -> Scan:
    try:
        return read_scan(path)
    except ScanError as exc:
        raise DatasetError(one_line(str(exc))) from None


def read_case(case: Case) -> tuple[Scan, Scan]:
    """A training case's image and label, checked to lie on one grid with whole-number labels.

    Raises:
        DatasetError: The case has no label, a file cannot be read, the shapes differ or
            the label holds non-integer values.
    """
    if case.label is None:
        raise DatasetError.at(case.image, f"training case {case.name!r} has no label file")
    image, label = _read(case.image), _read(case.label)
    if image.shape != label.shape:
        raise DatasetError.at(
            case.label, f"label shape {label.shape} differs from image shape {image.shape} ({case.image})"
        )
    if label.array.dtype.kind == "f" and not np.array_equal(label.array, np.round(label.array)):
        raise DatasetError.at(case.label, "label file holds non-integer values")
    return image, label
