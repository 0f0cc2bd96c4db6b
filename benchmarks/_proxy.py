"""The proxy set for an unseen patient: shifted copies of the one labelled scan, and their scoring.

A second scanner or patient differs from the training scan in contrast phase, noise,
sharpness, voxel grid, pose, field of view and file orientation. Each copy here applies
one of those shifts (and ``scanner_b`` several at once) to the image and moves the label
map with exactly the same geometry, using SimpleITK's resampler (linear for the image,
nearest neighbour for the labels), its smoothing filter and its reorientation. Nothing is
random except the noise, drawn from a fixed seed, so two tools predict identical files.

Folder written by :func:`build_proxy_set`::

    PROXY/images/<case>.nii.gz     what a tool segments (its mask must land on this grid)
    PROXY/labels/<case>.nii.gz     reference labels on the same grid (TotalSegmentator ids)
    PROXY/train_full/dataset.json  MSD dataset: the labelled scan, organ labels
    PROXY/train_slab/dataset.json  MSD dataset: the labelled scan less its held-out slab
    PROXY/proxy.json               cases, what each shift is, which labels count where

Scoring (:func:`score_masks`) takes a folder of predicted masks and the id -> name map of
the tool that made them, so masks from any tool (medvit, nnU-Net) are scored by name with
the same code: `medvit.pipelines.evaluate.evaluate_pair` (MONAI Dice and HD95) on the
copy's own grid, nothing resampled.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvit.pipelines import atomic

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ORGANS = ("spleen", "kidney_right", "kidney_left", "liver")
SEED = 20261202
# (start, stop) fractions of i, j, k: on the 122 x 101 x 30 scan, voxels 12-109, 6-89, 3-29.
FOV_CROP = ((0.1, 0.9), (0.06, 0.89), (0.1, 1.0))
AIR_HU = -1024.0


def label_names(data: Path = DATA) -> dict[int, str]:
    """TotalSegmentator's id -> name map used by the shared labels (background left out)."""
    table = json.loads((data / "ct" / "labels_total.json").read_text())
    return {int(k): v for k, v in table.items() if int(k) != 0}


def write_atomic(image: sitk.Image, path: Path) -> Path:
    """Write with SimpleITK (compressed) under a hidden temporary name, then rename into place."""
    return atomic.write_atomic(path, lambda tmp: sitk.WriteImage(image, str(tmp), True))


def _copy_atomic(src: Path, dst: Path) -> None:
    atomic.write_atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def json_atomic(payload: dict, path: Path) -> None:
    atomic.write_json(path, payload)


# -- the shifts -------------------------------------------------------------------------------
def _hu_image(image: sitk.Image, values: np.ndarray) -> sitk.Image:
    """`values` (SimpleITK's z, y, x order) as int16 HU on `image`'s grid."""
    out = sitk.GetImageFromArray(np.clip(np.rint(values), -32768, 32767).astype(np.int16))
    out.CopyInformation(image)
    return out


def contrast_phase(image: sitk.Image, scale: float = 1.1, offset: float = 40.0) -> sitk.Image:
    """Soft tissue (-100..250 HU) enhanced to ``scale * HU + offset``, as in another contrast phase.

    The change fades out over 100 HU on either side, so air, fat and bone keep their values
    and the mapping stays monotonic (no new edges inside an organ).
    """
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    weight = np.interp(hu, [-200.0, -100.0, 250.0, 350.0], [0.0, 1.0, 1.0, 0.0])
    return _hu_image(image, hu + weight * ((scale - 1.0) * hu + offset))


def add_noise(image: sitk.Image, sigma_hu: float = 25.0, seed: int = SEED) -> sitk.Image:
    """Gaussian noise of ``sigma_hu`` (a lower dose), from a fixed seed."""
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    return _hu_image(image, hu + np.random.default_rng(seed).normal(0.0, sigma_hu, hu.shape))


def blur(image: sitk.Image, sigma_mm: float = 2.0) -> sitk.Image:
    """A softer reconstruction kernel: Gaussian smoothing of ``sigma_mm`` (SimpleITK)."""
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma_mm)
    return _hu_image(image, sitk.GetArrayFromImage(smooth))


def regrid(image: sitk.Image, label: sitk.Image, spacing: tuple[float, float, float]) -> tuple[sitk.Image, sitk.Image]:
    """The same field of view on a grid of ``spacing`` mm: voxel edges of both grids coincide."""
    old_spacing = np.array(image.GetSpacing())
    new_spacing = np.array(spacing, dtype=float)
    extent = old_spacing * np.array(image.GetSize())
    size = [int(round(v)) for v in extent / new_spacing]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # Voxel centres sit half a voxel inside the field of view's edge.
    origin = np.array(image.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2.0)
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing(tuple(new_spacing))
    ref.SetOrigin(tuple(origin))
    ref.SetDirection(image.GetDirection())
    return _resample(image, label, ref, sitk.Transform())


def rotate(image: sitk.Image, label: sitk.Image, degrees: float) -> tuple[sitk.Image, sitk.Image]:
    """The patient turned by ``degrees`` about the body (superior-inferior) axis, on the same grid."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    transform = sitk.Euler3DTransform()
    transform.SetCenter(centre)
    transform.SetRotation(0.0, 0.0, float(np.deg2rad(degrees)))
    return _resample(image, label, image, transform)


def _resample(image: sitk.Image, label: sitk.Image, ref: sitk.Image, transform: sitk.Transform) -> tuple[sitk.Image, sitk.Image]:
    moved = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), ref, transform, sitk.sitkLinear, AIR_HU)
    moved_label = sitk.Resample(label, ref, transform, sitk.sitkNearestNeighbor, 0, label.GetPixelID())
    return _hu_image(moved, sitk.GetArrayFromImage(moved)), moved_label


def crop(image: sitk.Image, label: sitk.Image, box: tuple[tuple[float, float], ...]) -> tuple[sitk.Image, sitk.Image]:
    """A smaller field of view: ``box`` gives (start, stop) fractions of each of i, j, k.

    SimpleITK's slicing keeps every voxel's world position (the origin moves with the crop).
    """
    cut = tuple(slice(round(lo * n), round(hi * n)) for (lo, hi), n in zip(box, image.GetSize()))
    return image[cut], label[cut]


def reorient(image: sitk.Image, label: sitk.Image, code: str = "LPS") -> tuple[sitk.Image, sitk.Image]:
    """The same voxels stored in another axis order (``code`` as nibabel's axis codes)."""
    return sitk.DICOMOrient(image, code), sitk.DICOMOrient(label, code)


Shift = Callable[[sitk.Image, sitk.Image], tuple[sitk.Image, sitk.Image]]


def _intensity(fn: Callable[[sitk.Image], sitk.Image]) -> Shift:
    return lambda image, label: (fn(image), label)


def _scanner_b(image: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    image = blur(add_noise(contrast_phase(image), seed=SEED + 1), 1.5)
    image, label = rotate(*regrid(image, label, (1.0, 1.0, 2.0)), -8.0)
    return reorient(image, label, "LPS")


@dataclass(frozen=True)
class ProxyCopy:
    """One shifted copy: its case name, what it imitates, and the shift itself."""

    name: str
    description: str
    shift: Shift


PROXY_COPIES: tuple[ProxyCopy, ...] = (
    ProxyCopy("original", "the labelled scan itself (seen in training)", lambda image, label: (image, label)),
    ProxyCopy("contrast", "another contrast phase: soft tissue x1.1 + 40 HU", _intensity(contrast_phase)),
    ProxyCopy("noise", "lower dose: Gaussian noise, sigma 25 HU, fixed seed", _intensity(add_noise)),
    ProxyCopy("blur", "softer kernel: Gaussian blur, sigma 2 mm", _intensity(blur)),
    ProxyCopy("fine_grid", "0.8 x 0.8 mm in plane, 2 mm slices (resampled up: another grid)",
              lambda image, label: regrid(image, label, (0.8, 0.8, 2.0))),
    ProxyCopy("rotated", "patient turned 10 degrees about the body axis", lambda image, label: rotate(image, label, 10.0)),
    ProxyCopy("fov_crop", "smaller field of view: the central 80 % in i, 83 % in j (off centre), top 90 % of slices",
              lambda image, label: crop(image, label, FOV_CROP)),
    ProxyCopy("lps", "the same scan stored LPS (voxel axes flipped in plane)", reorient),
    ProxyCopy("scanner_b", "all at once: contrast, noise, blur 1.5 mm, 1 x 1 x 2 mm grid, -8 degrees, LPS", _scanner_b),
)


# -- building the set -------------------------------------------------------------------------
def _slab_offset(full: Path, part: Path) -> int:
    """Index of the first slice of `part` inside `full` (found by content: the headers are equal)."""
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(full)))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(part)))
    for k in range(a.shape[0] - b.shape[0] + 1):
        if np.array_equal(a[k : k + b.shape[0]], b):
            return k
    raise ValueError(f"{part} is not a slab of {full}")


def _training_json(out: Path, image: sitk.Image, label: sitk.Image, labels: dict[int, str], what: str) -> Path:
    write_atomic(image, out / "image.nii.gz")
    # only the declared labels: a training dataset's label map holds no undeclared values
    keep = np.isin(sitk.GetArrayViewFromImage(label), list(labels))
    declared = sitk.GetImageFromArray(np.where(keep, sitk.GetArrayViewFromImage(label), 0).astype(np.uint8))
    declared.CopyInformation(label)
    write_atomic(declared, out / "label.nii.gz")
    ds = {
        "name": what, "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in sorted(labels.items())}},
        "training": [{"image": "image.nii.gz", "label": "label.nii.gz"}],
    }
    json_atomic(ds, out / "dataset.json")
    return out / "dataset.json"


def build_proxy_set(
    out: Path,
    image_path: Path,
    label_path: Path,
    train_labels: tuple[str, ...] = ORGANS,
    holdout_slices: int = 10,
    full_ct: Path | None = None,
    patient3: Path | None = None,
    names: dict[int, str] | None = None,
) -> dict:
    """Write the proxy set of a labelled scan into `out` (see the module docstring).

    Args:
        out: Folder to write into (created).
        image_path: The labelled scan.
        label_path: Its TotalSegmentator label map.
        train_labels: Label names the training datasets ask a model to learn.
        holdout_slices: Number of bottom (first, inferior in a RAS file) slices held out of
            ``train_slab`` and written as the case ``heldout_slab``; 0 writes neither.
        full_ct: The longer CT the labelled scan was cut from: written as case ``full_ct``
            with the labels in place on the slab the scan came from.
        patient3: Folder with another patient's ``ct.nii.gz``, ``aorta.nii.gz`` and
            ``vertebrae_T12.nii.gz``: written as case ``patient3``, scored on those two only.
        names: Label id -> name of the label map; TotalSegmentator's by default.

    Returns:
        The manifest also written as ``out/proxy.json``.
    """
    names = names or label_names()
    ids = {v: k for k, v in names.items()}
    unknown = [n for n in train_labels if n not in ids]
    if unknown:
        raise ValueError(f"unknown label name(s): {', '.join(unknown)}")
    image = sitk.ReadImage(str(image_path))
    label = sitk.Cast(sitk.ReadImage(str(label_path)), sitk.sitkUInt8)
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v)
    cases: dict[str, dict] = {}
    for copy in PROXY_COPIES:
        moved, moved_label = copy.shift(image, label)
        write_atomic(moved_label, out / "labels" / f"{copy.name}.nii.gz")
        write_atomic(moved, out / "images" / f"{copy.name}.nii.gz")
        cases[copy.name] = {"kind": "proxy", "description": copy.description,
                            "seen": copy.name == "original", "scored": [names[i] for i in present]}
    chosen = {ids[n]: n for n in train_labels}
    manifest: dict = {"source_image": str(image_path), "source_label": str(label_path), "seed": SEED,
                      "train_labels": list(train_labels), "cases": cases,
                      "train_full": str(_training_json(out / "train_full", image, label, chosen, "labelled scan"))}
    n = image.GetSize()[2]
    if holdout_slices:
        if not 0 < holdout_slices < n:
            raise ValueError(f"--holdout-slices must be between 1 and {n - 1}, got {holdout_slices}")
        keep = (slice(None), slice(None), slice(holdout_slices, n))
        manifest["train_slab"] = str(_training_json(out / "train_slab", image[keep], label[keep], chosen,
                                                    f"labelled scan, slices {holdout_slices}-{n - 1}"))
        held = (slice(None), slice(None), slice(0, holdout_slices))
        write_atomic(label[held], out / "labels" / "heldout_slab.nii.gz")
        write_atomic(image[held], out / "images" / "heldout_slab.nii.gz")
        cases["heldout_slab"] = {"kind": "proxy", "seen": False, "scored": [names[i] for i in present],
                                 "description": f"slices 0-{holdout_slices - 1}, unseen by models trained on train_slab"}
    if full_ct is not None:
        start = _slab_offset(full_ct, image_path)
        full = sitk.ReadImage(str(full_ct))
        placed = np.zeros(sitk.GetArrayViewFromImage(full).shape, np.uint8)
        placed[start : start + n] = sitk.GetArrayFromImage(label)
        full_label = sitk.GetImageFromArray(placed)
        full_label.CopyInformation(full)
        write_atomic(full_label, out / "labels" / "full_ct.nii.gz")
        _copy_atomic(full_ct, out / "images" / "full_ct.nii.gz")
        cases["full_ct"] = {"kind": "full_ct", "seen": True, "labelled_slices": [start, start + n],
                            "scored": [names[i] for i in present],
                            "description": f"the CT the labelled scan was cut from; labels only on slices {start}-{start + n - 1}"}
    if patient3 is not None:
        ct = sitk.ReadImage(str(patient3 / "ct.nii.gz"))
        merged = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
        for name in ("vertebrae_T12", "aorta"):
            merged[sitk.GetArrayFromImage(sitk.ReadImage(str(patient3 / f"{name}.nii.gz"))) > 0] = ids[name]
        p3_label = sitk.GetImageFromArray(merged)
        p3_label.CopyInformation(ct)
        write_atomic(p3_label, out / "labels" / "patient3.nii.gz")
        _copy_atomic(patient3 / "ct.nii.gz", out / "images" / "patient3.nii.gz")
        cases["patient3"] = {"kind": "patient3", "seen": False, "scored": ["aorta", "vertebrae_T12"],
                             "description": "another patient (chest, LPS, 1.5 mm); only aorta and T12 are labelled"}
    json_atomic(manifest, out / "proxy.json")
    return manifest
