"""Datasets: MSD and nnU-Net v2 layouts, fingerprints, planning and cached preprocessing.

Three layouts are recognised by :func:`load_dataset`:

- ``msd``: a Medical Segmentation Decathlon ``dataset.json`` with ``labels`` mapping
  id -> name, ``training`` listing image/label pairs (paths relative to the json's
  folder) and ``modality``.
- ``nnunet``: an nnU-Net v2 ``dataset.json`` with ``labels`` mapping name -> id,
  ``channel_names`` and ``file_ending``; cases are the files
  ``imagesTr/<case>_0000<file_ending>`` with ``labelsTr/<case><file_ending>``.
- ``preprocessed``: a folder written by :func:`preprocess_dataset`, recognised by its
  ``medvit_preprocessed.json``.

The fingerprint and the planning rule follow nnU-Net (Isensee et al., "nnU-Net: a
self-configuring method for deep learning-based biomedical image segmentation",
Nature Methods 2021), with patch sizes kept to multiples of the ViT patch size.

Every problem with a dataset a user can cause raises :class:`DatasetError` with one
line naming the file and what is wrong. Given a list to collect into, :func:`load_dataset`
instead lists every problem with single cases there (as :class:`~medvit.pipelines.errors.Problem`) and carries on,
which is what :mod:`medvit.pipelines.verify` builds on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medvit.pipelines.atomic import write_atomic, write_json
from medvit.pipelines.errors import DatasetError, Problem
from medvit.pipelines.io import SCAN_SUFFIXES, Scan, ScanError, read_scan

__all__ = [
    "DATASET_JSON",
    "FINGERPRINT_JSON",
    "PREPROCESSED_JSON",
    "Case",
    "DatasetSpec",
    "PreprocessConfig",
    "compute_fingerprint",
    "load_dataset",
    "plan_from_fingerprint",
    "preprocess_dataset",
]

DATASET_JSON = "dataset.json"
PREPROCESSED_JSON = "medvit_preprocessed.json"
FINGERPRINT_JSON = "fingerprint.json"

# Foreground voxels sampled per case for the intensity statistics: enough for stable
# percentiles, little enough that a large dataset's samples fit in memory.
FOREGROUND_SAMPLES_PER_CASE = 10_000
# A dataset whose coarsest median spacing exceeds the finest by this factor is anisotropic.
ANISOTROPY_RATIO = 3.0
# Default patch cap (what a UNETR at 96^3 trains with) and the ViT patch size.
MAX_PATCH_VOXELS = 96**3
PATCH_MULTIPLE = 16

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


# ----------------------------------------------------------------------------- loading


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(path: str | Path, problem: str) -> DatasetError:
    error = DatasetError(_one_line(f"{path}: {problem}"))
    error.problem = Problem(Path(path), _one_line(problem))  # type: ignore[attr-defined]
    return error


def _report(sink: list[Problem] | None, path: str | Path, problem: str, warning: bool = False) -> None:
    """Raise the problem, or add it to ``sink`` when collecting them."""
    if sink is None:
        if warning:
            return
        raise _error(path, problem)
    sink.append(Problem(Path(path), _one_line(problem), warning))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _error(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(path, f"cannot read file ({_one_line(str(exc))})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _error(path, f"invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict):
        raise _error(path, f"expected a JSON object at the top level, got {type(data).__name__}")
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
        raise _error(path, "no such file or folder")
    if path.is_dir():
        if (path / PREPROCESSED_JSON).is_file():
            path = path / PREPROCESSED_JSON
        elif (path / DATASET_JSON).is_file():
            path = path / DATASET_JSON
        else:
            raise _error(path, f"no {DATASET_JSON} (or {PREPROCESSED_JSON}) in this folder")
    data = _read_json(path)
    if path.name == PREPROCESSED_JSON:
        return _load_preprocessed(path, data, problems)
    if "labels" not in data:
        raise _error(path, "no 'labels' entry (label ids and names)")
    labels = data["labels"]
    if not isinstance(labels, dict) or not labels:
        raise _error(path, "'labels' must be a non-empty object of label ids and names")
    if all(isinstance(v, str) for v in labels.values()):
        return _load_msd(path, data, problems)
    if all(isinstance(v, (int, list)) and not isinstance(v, bool) for v in labels.values()):
        return _load_nnunet(path, data, problems)
    raise _error(
        path,
        "'labels' must map ids to names (MSD, {\"1\": \"liver\"}) or names to ids (nnU-Net v2, {\"liver\": 1})",
    )


def _label_id(path: Path, value: Any, name: Any) -> int:
    try:
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError
        lid = int(value)
    except (TypeError, ValueError):
        raise _error(path, f"label {name!r} has id {value!r}; ids must be whole numbers") from None
    if lid < 0:
        raise _error(path, f"label {name!r} has negative id {lid}")
    return lid


def _check_labels(path: Path, labels: dict[int, str]) -> dict[int, str]:
    if not labels:
        raise _error(path, "'labels' has no foreground label (only background, id 0)")
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
        raise _error(path, f"'{key}' must be an object of channel names, got {type(entry).__name__}")
    if len(names) > 1:
        listed = ", ".join(names)
        raise _error(path, f"'{key}' lists {len(names)} channels ({listed}); only single-channel images are supported")
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
        raise _error(path, "no training cases")
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


def _load_msd(path: Path, data: dict[str, Any], sink: list[Problem] | None = None) -> DatasetSpec:
    labels: dict[int, str] = {}
    for key, name in data["labels"].items():
        lid = _label_id(path, key, name)
        if lid != 0:
            labels[lid] = name
    labels = _check_labels(path, labels)
    training = data.get("training")
    if training is None or training == []:
        raise _error(path, "no training cases ('training' is missing or empty)")
    if not isinstance(training, list):
        raise _error(path, f"'training' must be a list of image/label pairs, got {type(training).__name__}")
    root = path.parent
    cases = []
    for index, entry in enumerate(training):
        if not isinstance(entry, dict):
            raise _error(path, f"training case {index} must be an object with 'image' and 'label', got {entry!r}")
        image, label = entry.get("image"), entry.get("label")
        if not isinstance(image, str) or not image:
            raise _error(path, f"training case {index} has no 'image' path")
        if not isinstance(label, str) or not label:
            raise _error(path, f"training case {index} ({image}) has no 'label' path")
        image_path = root / image
        cases.append(Case(name=_case_name(image_path), image=image_path, label=root / label))
    _check_count(path, data, len(cases), sink)
    return DatasetSpec(
        root=root,
        name=str(data.get("name") or root.name),
        labels=labels,
        cases=_check_cases(path, cases, sink),
        modality=_modality(path, data.get("modality"), "modality"),
        layout="msd",
    )


def _load_nnunet(path: Path, data: dict[str, Any], sink: list[Problem] | None = None) -> DatasetSpec:
    labels: dict[int, str] = {}
    for name, value in data["labels"].items():
        if isinstance(value, list):
            raise _error(
                path, f"label {name!r} is a region ({value}); region-based nnU-Net labels are not supported"
            )
        if name == "ignore":
            raise _error(path, "label 'ignore' (nnU-Net sparse annotation) is not supported; every voxel must be labelled")
        lid = _label_id(path, value, name)
        if lid in labels:
            raise _error(path, f"labels {labels[lid]!r} and {name!r} share the id {lid}")
        if lid != 0:
            labels[lid] = str(name)
    labels = _check_labels(path, labels)
    channels = data.get("channel_names", data.get("modality"))
    modality = _modality(path, channels, "channel_names" if "channel_names" in data else "modality")
    ending = data.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise _error(path, f"'file_ending' must be a suffix such as \".nii.gz\", got {ending!r}")
    root = path.parent
    if "dataset" in data:
        cases = _nnunet_listed_cases(path, data["dataset"], sink)
    else:
        cases = _nnunet_found_cases(path, root, ending, sink)
    _check_count(path, data, len(cases), sink)
    return DatasetSpec(
        root=root,
        name=str(data.get("name") or root.name),
        labels=labels,
        cases=_check_cases(path, cases, sink),
        modality=modality,
        layout="nnunet",
    )


def _nnunet_found_cases(path: Path, root: Path, ending: str, sink: list[Problem] | None = None) -> list[Case]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise _error(images_dir, f"folder of training images for {path} does not exist")
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
        raise _error(path, f"no training cases (no imagesTr/<case>_0000{ending} files in {images_dir})")
    return cases


def _nnunet_listed_cases(path: Path, listed: Any, sink: list[Problem] | None = None) -> list[Case]:
    if not isinstance(listed, dict):
        raise _error(path, f"'dataset' must map case names to their files, got {type(listed).__name__}")
    cases = []
    for name, entry in listed.items():
        images = entry.get("images") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not images or not isinstance(label, str):
            raise _error(path, f"case {name!r} in 'dataset' needs 'images' (a list) and 'label'")
        if len(images) != 1:
            _report(sink, path, f"case {name!r} has {len(images)} image channels; only single-channel is supported")
        cases.append(Case(name=str(name), image=path.parent / images[0], label=path.parent / label))
    return cases


def _load_preprocessed(path: Path, data: dict[str, Any], sink: list[Problem] | None = None) -> DatasetSpec:
    root = path.parent
    for key in ("labels", "cases", "preprocessing"):
        if key not in data:
            raise _error(path, f"no {key!r} entry; not a complete medvit preprocessed folder")
    raw = data["labels"]
    if not isinstance(raw, dict) or not raw:
        raise _error(path, "'labels' must map class indices to {\"id\", \"name\"}")
    by_class: dict[int, tuple[int, str]] = {}
    for key, entry in raw.items():
        cls = _label_id(path, key, key)
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("name"), str):
            raise _error(path, f"class {key} must be {{\"id\": <original id>, \"name\": <name>}}, got {entry!r}")
        by_class[cls] = (_label_id(path, entry["id"], entry["name"]), entry["name"])
    classes = sorted(by_class)
    ids = [by_class[c][0] for c in classes]
    # Class c must be the c-th smallest original id, the order preprocess_transforms remaps to.
    if classes != list(range(1, len(classes) + 1)) or ids != sorted(set(ids)) or 0 in ids:
        raise _error(path, f"class indices {classes} with ids {ids} are not the remapping 1..K of the sorted ids")
    labels = {lid: name for lid, name in by_class.values()}
    if not isinstance(data["cases"], list):
        raise _error(path, "'cases' must be a list")
    cases = []
    for index, entry in enumerate(data["cases"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "image", "label")):
            raise _error(path, f"case {index} must have 'name', 'image' and 'label'")
        cases.append(Case(name=entry["name"], image=root / entry["image"], label=root / entry["label"]))
    preprocessing = data["preprocessing"]
    if not isinstance(preprocessing, dict):
        raise _error(path, "'preprocessing' must be an object")
    return DatasetSpec(
        root=root,
        name=str(data.get("name") or root.name),
        labels=labels,
        cases=_check_cases(path, cases, sink),
        modality=str(data.get("modality") or "CT"),
        layout="preprocessed",
        preprocessing=preprocessing,
        remapped=True,
    )


# ------------------------------------------------------------------------- fingerprint


def _read(path: Path) -> Scan:
    try:
        return read_scan(path)
    except ScanError as exc:
        raise DatasetError(_one_line(str(exc))) from None


def _read_case(case: Case) -> tuple[Scan, Scan]:
    if case.label is None:
        raise _error(case.image, f"training case {case.name!r} has no label file")
    image, label = _read(case.image), _read(case.label)
    if image.shape != label.shape:
        raise _error(case.label, f"label shape {label.shape} differs from image shape {image.shape} ({case.image})")
    if label.array.dtype.kind == "f" and not np.array_equal(label.array, np.round(label.array)):
        raise _error(case.label, "label file holds non-integer values")
    return image, label


def _ras_order(scan: Scan) -> tuple[list[float], list[int]]:
    """Spacing and shape along RAS axes x, y, z (the order after reorientation to RAS)."""
    ornt = nib.io_orientation(scan.affine)
    spacing, shape = [0.0] * 3, [0] * 3
    for voxel_axis, (world_axis, _) in enumerate(ornt):
        spacing[int(world_axis)] = float(scan.spacing[voxel_axis])
        shape[int(world_axis)] = int(scan.shape[voxel_axis])
    return spacing, shape


def _pick_cases(cases: list[Case], max_cases: int | None) -> list[Case]:
    if max_cases is None or max_cases >= len(cases):
        return list(cases)
    if max_cases < 1:
        raise DatasetError(f"max_cases must be at least 1, got {max_cases}")
    # Spread over the list: datasets are often sorted by site or scanner.
    index = np.unique(np.round(np.linspace(0, len(cases) - 1, max_cases)).astype(int))
    return [cases[i] for i in index]


def compute_fingerprint(spec: DatasetSpec, max_cases: int | None = None) -> dict:
    """Measure a dataset: geometry, foreground intensities and label sizes.

    Spacings and shapes are given along the RAS axes x, y, z, the axis order the
    volumes have after reorientation to RAS (so they compare directly with
    ``Preprocessing.spacing``); ``orientations`` keeps each file's own axis codes.
    Intensity statistics pool up to 10,000 foreground voxels per case, drawn with a
    fixed seed; foreground is any voxel holding one of the dataset's labels. Label ids
    are string keys, so the dict is unchanged by a JSON round trip.

    Args:
        spec: The dataset.
        max_cases: Measure at most this many cases, spread evenly over the list.

    Returns:
        ``num_cases``, ``modality``, ``spacings``, ``shapes``, ``orientations``,
        ``median_spacing``, ``median_shape``, ``intensity`` (``mean``, ``std``, ``min``,
        ``max``, ``median``, ``percentile_00_5``, ``percentile_99_5``, ``num_samples``;
        None values without foreground), ``label_voxels`` (id -> voxels over all
        cases), ``label_volume_ml`` (id -> ml over all cases), ``label_volume_ml_mean``
        (id -> ml per case), ``labels`` (id -> name) and ``suggested``
        (:func:`plan_from_fingerprint`).

    Raises:
        DatasetError: A file cannot be read, or a label does not fit its image.
    """
    cases = _pick_cases(spec.cases, max_cases)
    if not cases:
        raise _error(spec.root, "no training cases")
    rng = np.random.default_rng(0)
    spacings, shapes, orientations, samples = [], [], [], []
    voxels = {lid: 0 for lid in spec.label_ids}
    volume = {lid: 0.0 for lid in spec.label_ids}
    # In a remapped (preprocessed) dataset, original id label_ids[c - 1] is stored as c.
    stored = {lid: (c if spec.remapped else lid) for c, lid in enumerate(spec.label_ids, start=1)}
    for case in cases:
        image, label = _read_case(case)
        spacing, shape = _ras_order(image)
        spacings.append(spacing)
        shapes.append(shape)
        orientations.append(image.orientation())
        voxel_ml = abs(float(np.linalg.det(image.affine[:3, :3]))) / 1000.0
        lab = label.array
        foreground = np.zeros(lab.shape, dtype=bool)
        for lid, value in stored.items():
            mask = lab == value
            count = int(np.count_nonzero(mask))
            voxels[lid] += count
            volume[lid] += count * voxel_ml
            foreground |= mask
        values = image.array[foreground]
        if values.size > FOREGROUND_SAMPLES_PER_CASE:
            values = rng.choice(values, FOREGROUND_SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float64))
    pooled = np.concatenate(samples)
    fp: dict[str, Any] = {
        "num_cases": len(cases),
        "modality": spec.modality,
        "spacings": spacings,
        "shapes": shapes,
        "orientations": orientations,
        "median_spacing": [float(v) for v in np.median(np.asarray(spacings), axis=0)],
        "median_shape": [float(v) for v in np.median(np.asarray(shapes), axis=0)],
        "intensity": _intensity_stats(pooled),
        "label_voxels": {str(k): v for k, v in voxels.items()},
        "label_volume_ml": {str(k): round(v, 3) for k, v in volume.items()},
        "label_volume_ml_mean": {str(k): round(v / len(cases), 3) for k, v in volume.items()},
        "labels": {str(k): v for k, v in spec.labels.items()},
    }
    fp["suggested"] = plan_from_fingerprint(fp)
    return fp


def _intensity_stats(values: np.ndarray) -> dict[str, float | int | None]:
    keys = ("mean", "std", "min", "max", "median", "percentile_00_5", "percentile_99_5")
    if values.size == 0:
        return {**{k: None for k in keys}, "num_samples": 0}
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
        "median": float(p50),
        "percentile_00_5": float(p005),
        "percentile_99_5": float(p995),
        "num_samples": int(values.size),
    }


# ---------------------------------------------------------------------------- planning


def plan_from_fingerprint(
    fp: dict, max_patch_voxels: int = MAX_PATCH_VOXELS, patch_multiple: int = PATCH_MULTIPLE
) -> dict:
    """Choose the target spacing and training patch size from a fingerprint.

    Rule (nnU-Net's, with ViT-friendly patch sizes):

    1. Target spacing is the per-axis median spacing. If the dataset is strongly
       anisotropic (largest median spacing > 3x the smallest), the coarse axis instead
       gets the 10th percentile of the cases' spacings along it, so only the finest
       tenth of the cases lose resolution along it; it is never made finer than the
       next coarsest axis.
    2. Patch size starts as the median shape brought to the target spacing
       (``median_shape * median_spacing / target``).
    3. Each axis is rounded down to a multiple of ``patch_multiple`` (16, the ViT
       patch), with ``patch_multiple`` as the minimum.
    4. While the patch has more than ``max_patch_voxels`` voxels, the largest axis
       (the first of equals) is shrunk by ``patch_multiple``.

    Args:
        fp: A fingerprint with ``median_spacing``, ``median_shape`` and ``spacings``
            (along RAS axes x, y, z).
        max_patch_voxels: Cap on the patch's voxel count (memory).
        patch_multiple: Every patch axis is a multiple of this.

    Returns:
        ``{"spacing": [x, y, z], "patch_size": [x, y, z]}``.

    Raises:
        DatasetError: The fingerprint lacks a field or holds unusable values, or the
            cap is below ``patch_multiple ** 3``.
    """
    if patch_multiple < 1 or max_patch_voxels < patch_multiple**3:
        raise DatasetError(
            f"max_patch_voxels ({max_patch_voxels}) must be at least patch_multiple ** 3 ({patch_multiple}**3)"
        )
    try:
        median_spacing = np.asarray(fp["median_spacing"], dtype=np.float64)
        median_shape = np.asarray(fp["median_shape"], dtype=np.float64)
        spacings = np.asarray(fp.get("spacings") or [fp["median_spacing"]], dtype=np.float64)
    except KeyError as exc:
        raise DatasetError(f"fingerprint has no {exc.args[0]!r} entry") from None
    except (TypeError, ValueError):
        raise DatasetError("fingerprint spacings and shapes must be lists of numbers") from None
    if median_spacing.shape != (3,) or median_shape.shape != (3,) or spacings.ndim != 2 or spacings.shape[1] != 3:
        raise DatasetError("fingerprint spacings and shapes must have three values (x, y, z) each")
    if not (np.all(median_spacing > 0) and np.all(median_shape > 0) and np.all(spacings > 0)):
        raise DatasetError("fingerprint spacings and shapes must be positive")

    target = median_spacing.copy()
    coarse = int(np.argmax(median_spacing))
    if median_spacing.max() / median_spacing.min() > ANISOTROPY_RATIO:
        others = np.delete(median_spacing, coarse)
        target[coarse] = max(float(np.percentile(spacings[:, coarse], 10)), float(others.max()))

    patch = _patch_size(median_shape, median_spacing, target, max_patch_voxels, patch_multiple)
    return {"spacing": [float(s) for s in target], "patch_size": patch}


def _patch_size(
    median_shape: np.ndarray, median_spacing: np.ndarray, target: np.ndarray, max_voxels: int, multiple: int
) -> list[int]:
    """Steps 2-4 of the planning rule in :func:`plan_from_fingerprint`."""
    extent = np.asarray(median_shape, dtype=np.float64) * np.asarray(median_spacing) / np.asarray(target)
    # The epsilon keeps 63.99999 (a float artefact of an exact 64) from rounding down to 48.
    patch = [max(multiple, int((n + 1e-6) // multiple) * multiple) for n in extent]
    while int(np.prod(patch)) > max_voxels:
        axis = int(np.argmax(patch))
        patch[axis] = max(multiple, patch[axis] - multiple)
    return patch


# ------------------------------------------------------------------------ preprocessing


@dataclass
class PreprocessConfig:
    """How :func:`preprocess_dataset` treats the volumes.

    Attributes:
        spacing: Target voxel size in mm along RAS x, y, z; None uses the planned spacing.
        intensity: Intensity preset (``ct``, ``mr`` or ``none``); None picks ``ct`` for
            CT, ``mr`` for MR and ``none`` for any other modality.
    """

    spacing: tuple[float, float, float] | None = None
    intensity: str | None = None


def _intensity_for(modality: str) -> str:
    return {"CT": "ct", "MR": "mr"}.get(modality.upper(), "none")


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_data_dtype(array.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    write_atomic(path, lambda tmp: nib.save(image, str(tmp)))


def _source_files(spec: DatasetSpec) -> Iterable[Path]:
    for case in spec.cases:
        yield case.image.resolve()
        if case.label is not None:
            yield case.label.resolve()


def preprocess_dataset(
    spec: DatasetSpec, out_dir: str | Path, config: PreprocessConfig | None = None, progress: bool = True
) -> Path:
    """Reorient, resample, normalise and remap every case once, and cache the result.

    Writes ``imagesTr/<case>.nii.gz`` (float32, normalised, RAS, target spacing) and
    ``labelsTr/<case>.nii.gz`` (uint8 class indices 0..K, class ``c`` being
    ``spec.label_ids[c - 1]``), then ``fingerprint.json`` (of the source dataset) and,
    last, ``medvit_preprocessed.json``: ``name``, ``modality``, ``labels`` (class index
    -> ``{"id", "name"}``), ``preprocessing`` (``Preprocessing.to_dict()``), ``plan``
    (spacing and patch size for that spacing), ``cases`` (``name``, ``image``,
    ``label`` relative to the folder) and ``source`` (the source dataset's folder).
    :func:`load_dataset` on the folder gives a spec with ``remapped`` True. Every file
    is written under a temporary name and renamed into place, and the manifest is
    removed first and written last, so an interrupted run never looks complete.

    Args:
        spec: A source dataset (``msd`` or ``nnunet``).
        out_dir: Output folder, created if needed; must not be the source's folder.
        config: Target spacing and intensity preset; defaults to the plan and modality.
        progress: Show a progress bar.

    Returns:
        ``out_dir``.

    Raises:
        DatasetError: The spec is already preprocessed, the output would overwrite the
            source, a case cannot be read, or an output cannot be written.
    """
    # Imported here: MONAI and torch are slow to import and loading/fingerprinting needs neither.
    from tqdm.auto import tqdm

    from medvit.pipelines.transforms import Preprocessing, preprocess_transforms

    config = config or PreprocessConfig()
    out = Path(out_dir)
    if spec.remapped:
        raise _error(spec.root, "is already a preprocessed dataset; preprocess its source dataset instead")
    if out.exists() and not out.is_dir():
        raise _error(out, "output path exists and is not a folder")
    if out.resolve() == spec.root.resolve():
        raise _error(out, "output folder is the source dataset's folder; choose another folder")
    outputs = {(out / sub / f"{c.name}.nii.gz").resolve() for c in spec.cases for sub in ("imagesTr", "labelsTr")}
    clash = next((p for p in _source_files(spec) if p in outputs), None)
    if clash is not None:
        raise _error(clash, f"would be overwritten by the preprocessed output in {out}; choose another folder")
    num_classes = len(spec.label_ids)
    if num_classes > 255:
        raise _error(spec.root, f"{num_classes} labels do not fit the uint8 class maps (at most 255)")

    # Checked before the slow fingerprint, so a bad spacing or preset fails at once.
    intensity = config.intensity if config.intensity is not None else _intensity_for(spec.modality)
    prep = Preprocessing(spacing=config.spacing, intensity=intensity)
    fingerprint = compute_fingerprint(spec)
    if prep.spacing is None:
        planned = tuple(fingerprint["suggested"]["spacing"])
        prep = Preprocessing(spacing=planned, intensity=intensity)  # type: ignore[arg-type]
    prep = prep.with_fingerprint(fingerprint)
    transform = preprocess_transforms(prep, keys=("image", "label"), label_ids=spec.label_ids)

    try:
        for sub in ("imagesTr", "labelsTr"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        (out / PREPROCESSED_JSON).unlink(missing_ok=True)
    except OSError as exc:
        raise _error(out, f"cannot create output folder ({_one_line(str(exc))})") from None

    entries = []
    for case in tqdm(spec.cases, desc="preprocess", unit="case", disable=not progress):
        image, label = _read_case(case)
        result = transform({"image": image, "label": label})
        affine = np.asarray(result["image"].affine, dtype=np.float64)
        image_out = result["image"][0].numpy().astype(np.float32)
        label_out = np.rint(result["label"][0].numpy()).astype(np.uint8)
        entry = {"name": case.name, "image": f"imagesTr/{case.name}.nii.gz", "label": f"labelsTr/{case.name}.nii.gz"}
        try:
            _write_nifti(out / entry["image"], image_out, affine)
            _write_nifti(out / entry["label"], label_out, affine)
        except OSError as exc:
            raise _error(out / entry["image"], f"cannot write preprocessed case ({_one_line(str(exc))})") from None
        entries.append(entry)

    target = list(prep.spacing)  # type: ignore[arg-type]
    plan = {
        "spacing": [float(s) for s in target],
        "patch_size": _patch_size(
            np.asarray(fingerprint["median_shape"]), np.asarray(fingerprint["median_spacing"]), np.asarray(target),
            MAX_PATCH_VOXELS, PATCH_MULTIPLE,
        ),
    }
    manifest = {
        "name": spec.name,
        "modality": spec.modality,
        "labels": {str(c): {"id": lid, "name": spec.labels[lid]} for c, lid in enumerate(spec.label_ids, start=1)},
        "preprocessing": prep.to_dict(),
        "plan": plan,
        "cases": entries,
        "source": str(spec.root.resolve()),
    }
    try:
        write_json(out / FINGERPRINT_JSON, fingerprint)
        write_json(out / PREPROCESSED_JSON, manifest)
    except OSError as exc:
        raise _error(out, f"cannot write dataset files ({_one_line(str(exc))})") from None
    return out
