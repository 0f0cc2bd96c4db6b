"""Preprocessing a dataset once: every case reoriented, resampled, normalised and cached.

The result is a folder in the ``preprocessed`` layout (:mod:`medvit.pipelines.datasets`)
that training reads in place of the source dataset.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvit.pipelines.atomic import write_json
from medvit.pipelines.datasets import PREPROCESSED_JSON, DatasetSpec, read_case
from medvit.pipelines.errors import DatasetError, one_line
from medvit.pipelines.fingerprint import FINGERPRINT_JSON, compute_fingerprint
from medvit.pipelines.nifti import write_nifti
from medvit.pipelines.planning import patch_size
from medvit.pipelines.preprocessing import Preprocessing, default_intensity

__all__ = ["PreprocessConfig", "preprocess_dataset"]


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
    :func:`~medvit.pipelines.datasets.load_dataset` on the folder gives a spec with ``remapped`` True. Every file
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
    # Imported here: MONAI and torch are slow to import, and `medvit preprocess` imports
    # this module before it knows the dataset can be read.
    from tqdm.auto import tqdm

    from medvit.pipelines.transforms import preprocess_transforms

    config = config or PreprocessConfig()
    out = Path(out_dir)
    if spec.remapped:
        raise DatasetError.at(spec.root, "is already a preprocessed dataset; preprocess its source dataset instead")
    if out.exists() and not out.is_dir():
        raise DatasetError.at(out, "output path exists and is not a folder")
    if out.resolve() == spec.root.resolve():
        raise DatasetError.at(out, "output folder is the source dataset's folder; choose another folder")
    outputs = {(out / sub / f"{c.name}.nii.gz").resolve() for c in spec.cases for sub in ("imagesTr", "labelsTr")}
    clash = next((p for p in _source_files(spec) if p in outputs), None)
    if clash is not None:
        raise DatasetError.at(clash, f"would be overwritten by the preprocessed output in {out}; choose another folder")
    num_classes = len(spec.label_ids)
    if num_classes > 255:
        raise DatasetError.at(spec.root, f"{num_classes} labels do not fit the uint8 class maps (at most 255)")

    # Checked before the slow fingerprint, so a bad spacing or preset fails at once.
    intensity = config.intensity if config.intensity is not None else default_intensity(spec.modality)
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
        raise DatasetError.at(out, f"cannot create output folder ({one_line(str(exc))})") from None

    entries = []
    for case in tqdm(spec.cases, desc="preprocess", unit="case", disable=not progress):
        image, label = read_case(case)
        result = transform({"image": image, "label": label})
        affine = np.asarray(result["image"].affine, dtype=np.float64)
        image_out = result["image"][0].numpy().astype(np.float32)
        label_out = np.rint(result["label"][0].numpy()).astype(np.uint8)
        entry = {"name": case.name, "image": f"imagesTr/{case.name}.nii.gz", "label": f"labelsTr/{case.name}.nii.gz"}
        try:
            write_nifti(out / entry["image"], image_out, affine)
            write_nifti(out / entry["label"], label_out, affine)
        except OSError as exc:
            raise DatasetError.at(
                out / entry["image"], f"cannot write preprocessed case ({one_line(str(exc))})"
            ) from None
        entries.append(entry)

    target = list(prep.spacing)  # type: ignore[arg-type]
    plan = {
        "spacing": [float(s) for s in target],
        "patch_size": patch_size(
            np.asarray(fingerprint["median_shape"]), np.asarray(fingerprint["median_spacing"]), np.asarray(target)
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
        raise DatasetError.at(out, f"cannot write dataset files ({one_line(str(exc))})") from None
    return out
