"""Deterministic CT-like abdominal phantoms with exact organ labels.

The phantom makes the small sample scan behind the README's first command and the
training cases for the sample checkpoint, so the project needs no downloaded data.
Anatomy is defined in world millimetres (nibabel's RAS+ convention: +x is the
patient's right, +y anterior, +z superior), so it keeps its size whatever voxel
shape, spacing or orientation is asked for. It is a compact, infant-sized abdomen
(body about 124 x 100 mm) so that it fits inside the default 144 x 120 x 120 mm
field of view with air all round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform
from scipy.ndimage import gaussian_filter
from scipy.spatial.transform import Rotation

from medvit.pipelines.atomic import write_json
from medvit.pipelines.nifti import write_nifti

__all__ = ["LABELS", "Phantom", "make_phantom", "save_phantom", "write_phantom_dataset"]

LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}

# Nominal Hounsfield units (portal-venous-like contrast phase).
HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 45.0,
    "bowel": -30.0,  # mean of the mesenteric fat / bowel-loop mixture filling the cavity
    "cortical_bone": 700.0,
    "cancellous_bone": 400.0,
    "disc": 90.0,
    "vertebral_arch": 600.0,
    "csf": 15.0,
    "aorta": 180.0,
    "ivc": 120.0,
    "liver": 60.0,
    "spleen": 50.0,
    "kidney_cortex": 150.0,
    "kidney_medulla": 100.0,
}
NOISE_HU = 15.0
BLUR_MM = 0.75

_BODY_SEMI_AXES = (62.0, 50.0)  # left-right, anterior-posterior half-widths in mm
_ABDOMINAL_WALL_MM = 3.0
_MAX_GAS_POCKETS = 6


@dataclass(frozen=True)
class _Organ:
    label: int
    centre: tuple[float, float, float]  # template RAS mm
    semi_axes: tuple[float, float, float]  # mm, before the per-case rotation
    yaw_deg: float  # rotation about the S axis that sets the organ's long axis
    hu: float


# Kidneys are painted first and the liver last: the liver is the largest organ and
# wraps around the others, so letting it yield keeps the small organs whole.
_ORGANS = (
    _Organ(3, (28.0, -22.0, -20.0), (10.0, 13.0, 24.0), 27.0, HU["kidney_cortex"]),
    _Organ(4, (-28.0, -22.0, -12.0), (10.0, 13.0, 24.0), -27.0, HU["kidney_cortex"]),
    _Organ(2, (-34.0, -16.0, 16.0), (11.0, 22.0, 26.0), 37.0, HU["spleen"]),
    _Organ(1, (27.0, 6.0, 14.0), (28.0, 30.0, 40.0), -20.0, HU["liver"]),
)


@dataclass
class Phantom:
    """A synthetic CT volume and its organ labels.

    Attributes:
        image: int16 Hounsfield units in voxel order (i, j, k).
        labels: uint8 organ labels (see `LABELS`), same shape as `image`.
        affine: 4x4 voxel-to-world matrix in RAS+ millimetres (nibabel convention).
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray


def _parse_orientation(orientation: str) -> np.ndarray:
    codes = tuple(str(orientation).upper())
    axis_of = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
    if len(codes) != 3 or any(c not in axis_of for c in codes) or {axis_of[c] for c in codes} != {0, 1, 2}:
        raise ValueError(
            f"orientation {orientation!r} is not a valid axis code: "
            "use one letter each from L/R, A/P and S/I, e.g. 'LPS'"
        )
    return axcodes2ornt(codes)


def _check_geometry(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    if len(shape) != 3 or any(int(n) != n or n < 1 for n in shape):
        raise ValueError(f"shape must be three positive integers, got {shape!r}")
    if len(spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in spacing):
        raise ValueError(f"spacing must be three positive millimetre values, got {spacing!r}")


def _affine(shape: tuple[int, int, int], spacing: tuple[float, float, float], ornt: np.ndarray) -> np.ndarray:
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for i, (axis, sign) in enumerate(ornt):
        affine[int(axis), i] = sign * spacing[i]
    # Centre voxel at world origin, where the anatomy is centred.
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=float) - 1.0) / 2.0)
    return affine


def _smooth_field(
    rng: np.random.Generator, coords: tuple[np.ndarray, ...], n_terms: int, freq: tuple[float, float]
) -> np.ndarray:
    """Sum of random plane waves: a cheap, seedable, grid-independent low-frequency field.

    Args:
        rng: Source of the wave directions, frequencies and phases.
        coords: Three broadcastable coordinate arrays the field is evaluated on.
        n_terms: Number of plane waves.
        freq: Range of angular frequencies, in radians per unit of `coords`.

    Returns:
        Field with roughly unit amplitude (|value| <= 1).
    """
    directions = rng.normal(size=(n_terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    waves = directions * rng.uniform(*freq, size=(n_terms, 1))
    phases = rng.uniform(0.0, 2.0 * np.pi, size=n_terms)
    weights = rng.uniform(0.5, 1.0, size=n_terms)
    weights /= weights.sum()
    field = np.zeros(np.broadcast_shapes(*(c.shape for c in coords)), dtype=np.float32)
    for w, phase, weight in zip(waves, phases, weights):  # a handful of waves, each vectorised
        field += np.float32(weight) * np.sin(w[0] * coords[0] + w[1] * coords[1] + w[2] * coords[2] + phase)
    return field


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1.0


def _organ(rng: np.random.Generator, organ: _Organ, q: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Deformed-ellipsoid mask of one organ and each voxel's squared radius in the organ's unit frame."""
    shift = rng.uniform(-3.0, 3.0, size=3)
    scale = rng.uniform(0.92, 1.08, size=3)
    tilt = rng.uniform(-8.0, 8.0, size=3)
    rotation = Rotation.from_euler("xyz", tilt + (0.0, 0.0, organ.yaw_deg), degrees=True).as_matrix()
    centre = np.asarray(organ.centre) + shift
    semi = np.asarray(organ.semi_axes) * scale
    d = [q[b] - np.float32(centre[b]) for b in range(3)]
    # Local, unit-sphere coordinates: u = R^T (q - c) / semi-axes.
    u = [sum(np.float32(rotation[b, a]) * d[b] for b in range(3)) / np.float32(semi[a]) for a in range(3)]
    radius2 = u[0] ** 2 + u[1] ** 2 + u[2] ** 2
    # Deform the boundary in the organ's own frame, so the wobble scales with the organ.
    bump = _smooth_field(rng, tuple(u), n_terms=4, freq=(1.5, 3.5))
    return radius2 < (1.0 + 0.15 * bump) ** 2, radius2


def _render(
    rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free HU image and labels sampled at the RAS world coordinates x, y, z (open grids)."""
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)

    # Per-case global pose and size; q are template coordinates of each voxel.
    g_shift = rng.uniform(-3.0, 3.0, size=3)
    g_scale = rng.uniform(0.96, 1.04, size=3)
    g_yaw = np.deg2rad(rng.uniform(-4.0, 4.0))
    c, s = np.float32(np.cos(g_yaw)), np.float32(np.sin(g_yaw))
    dx, dy = x - np.float32(g_shift[0]), y - np.float32(g_shift[1])
    q = (
        (c * dx + s * dy) / np.float32(g_scale[0]),
        (-s * dx + c * dy) / np.float32(g_scale[1]),
        (z - np.float32(g_shift[2])) / np.float32(g_scale[2]),
    )
    qx, qy, qz = q

    fat_mm = rng.uniform(4.0, 7.0)
    ax, ay = _BODY_SEMI_AXES
    body = _ellipse(qx, qy, 0, 0, ax, ay)
    wall = _ellipse(qx, qy, 0, 0, ax - fat_mm, ay - fat_mm)
    cavity = _ellipse(qx, qy, 0, 0, ax - fat_mm - _ABDOMINAL_WALL_MM, ay - fat_mm - _ABDOMINAL_WALL_MM)

    # Mesenteric fat and bowel loops: a texture the model must learn to ignore.
    bowel = HU["bowel"] + 45.0 * np.tanh(2.0 * _smooth_field(rng, q, n_terms=6, freq=(0.12, 0.3)))

    muscles = _ellipse(qx, qy, 15, -38, 8, 8) | _ellipse(qx, qy, -15, -38, 8, 8)
    vertebra = _ellipse(qx, qy, 0, -22, 13, 11)
    cancellous = _ellipse(qx, qy, 0, -22, 11, 9)
    canal = _ellipse(qx, qy, 0, -38, 5, 5)
    arch = _ellipse(qx, qy, 0, -38, 8.5, 8.5) & ~canal
    disc_phase = rng.uniform(0.0, 30.0)
    # Discs every 30 mm so the spine is not a featureless cylinder along z.
    disc = vertebra & (np.mod(qz - np.float32(disc_phase), 30.0) < 7.0)
    aorta = _ellipse(qx, qy, -7, -5, 6, 6)
    ivc = _ellipse(qx, qy, 11, -3, 7, 5)
    reserved = muscles | vertebra | canal | arch | aorta | ivc

    labels = np.zeros(shape, dtype=np.uint8)
    image = np.full(shape, HU["air"], dtype=np.float32)
    image[np.broadcast_to(body, shape)] = HU["fat"]
    image[np.broadcast_to(wall, shape)] = HU["muscle"]
    image = np.where(cavity, bowel, image)
    # Later structures overwrite earlier ones, so the paint order is the anatomical priority.
    for mask, hu in (
        (muscles, HU["muscle"]),
        (vertebra, HU["cortical_bone"]),
        (cancellous, HU["cancellous_bone"]),
        (disc, HU["disc"]),
        (arch, HU["vertebral_arch"]),
        (canal, HU["csf"]),
        (aorta, HU["aorta"]),
        (ivc, HU["ivc"]),
    ):
        image[np.broadcast_to(mask, shape)] = hu

    free = np.broadcast_to(cavity & ~reserved, shape)
    for organ in _ORGANS:
        inside, radius2 = _organ(rng, organ, q)
        region = inside & free & (labels == 0)
        labels[region] = organ.label
        image[region] = organ.hu
        if organ.label in (3, 4):
            image[region & (radius2 < 0.5**2)] = HU["kidney_medulla"]

    # Gas only where nothing is labelled, so labels stay exact. Parameters for every
    # possible pocket are drawn so the random stream does not depend on the count.
    n_gas = int(rng.integers(2, _MAX_GAS_POCKETS + 1))
    centres = rng.uniform((-40.0, 0.0, -50.0), (20.0, 38.0, 50.0), size=(_MAX_GAS_POCKETS, 3))
    radii = rng.uniform(3.0, 8.0, size=_MAX_GAS_POCKETS)
    for centre, radius in zip(centres[:n_gas], radii[:n_gas]):
        pocket = sum((q[a] - np.float32(centre[a])) ** 2 for a in range(3)) < radius**2
        image[pocket & free & (labels == 0)] = HU["air"]
    return image, labels


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 80, 40),
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0),
    orientation: str = "LPS",
) -> Phantom:
    """Generate one deterministic CT-like abdominal phantom.

    The anatomy (body outline with subcutaneous fat, spine, aorta, IVC, liver on the
    patient's right, spleen on the left-posterior, two kidneys beside the spine, bowel
    gas) depends only on `seed`; the grid only decides where it is sampled. The same
    seed in two orientations therefore gives voxel-for-voxel the same volume, flipped
    and transposed, and the same anatomy in world millimetres at any spacing.

    Args:
        seed: Random seed for the per-case pose, organ shapes, texture and noise.
        shape: Number of voxels along voxel axes (i, j, k).
        spacing: Voxel size in mm along voxel axes (i, j, k).
        orientation: Axis codes naming where each voxel axis points ("LPS": i towards
            the patient's left, j posterior, k superior).

    Returns:
        The phantom, with the world origin at the centre of the volume.

    Raises:
        ValueError: If shape, spacing or orientation is malformed.
    """
    shape = tuple(shape)
    spacing = tuple(float(s) for s in spacing)
    _check_geometry(shape, spacing)
    ornt = _parse_orientation(orientation)
    shape = tuple(int(n) for n in shape)

    # Render on the RAS-ordered version of the requested grid, then flip/transpose: this
    # makes every orientation of one seed the same volume, noise included.
    ras_shape = [0, 0, 0]
    ras_spacing = [0.0, 0.0, 0.0]
    for i, (axis, _) in enumerate(ornt):
        ras_shape[int(axis)] = shape[i]
        ras_spacing[int(axis)] = spacing[i]
    coords = [((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * sp) for n, sp in zip(ras_shape, ras_spacing)]
    x, y, z = coords[0][:, None, None], coords[1][None, :, None], coords[2][None, None, :]

    anatomy_seq, noise_seq = np.random.SeedSequence(seed).spawn(2)
    clean, labels = _render(np.random.default_rng(anatomy_seq), x, y, z)

    blur = [BLUR_MM / sp for sp in ras_spacing]
    image = gaussian_filter(clean, sigma=blur, mode="nearest")
    # CT noise is spatially correlated; smooth white noise, then restore its level.
    noise = gaussian_filter(
        np.random.default_rng(noise_seq).standard_normal(tuple(ras_shape), dtype=np.float32), sigma=blur
    )
    std = float(noise.std())
    if std > 0:
        image += noise * np.float32(NOISE_HU / std)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    to_target = ornt_transform(axcodes2ornt(("R", "A", "S")), ornt)
    return Phantom(
        image=np.ascontiguousarray(apply_orientation(image, to_target)),
        labels=np.ascontiguousarray(apply_orientation(labels, to_target)),
        affine=_affine(shape, spacing, ornt),
    )


def save_phantom(phantom: Phantom, image_path: str | os.PathLike, label_path: str | os.PathLike) -> None:
    """Write a phantom as two NIfTI files on the same grid.

    Args:
        phantom: The phantom to write.
        image_path: Destination of the int16 HU image (.nii or .nii.gz).
        label_path: Destination of the uint8 label map (.nii or .nii.gz).

    Raises:
        ValueError: If a path is not a NIfTI file name or the arrays disagree in shape.
    """
    paths = [Path(image_path), Path(label_path)]
    for path in paths:
        if not path.name.endswith((".nii", ".nii.gz")):
            raise ValueError(f"{path}: phantom files must end in .nii or .nii.gz")
    if phantom.image.shape != phantom.labels.shape:
        raise ValueError(f"phantom image shape {phantom.image.shape} differs from labels shape {phantom.labels.shape}")
    write_nifti(paths[0], phantom.image.astype(np.int16, copy=False), phantom.affine)
    write_nifti(paths[1], phantom.labels.astype(np.uint8, copy=False), phantom.affine)


def _case_seed(seed: int, index: int) -> int:
    # Derived rather than seed + index, so datasets made with nearby seeds share no case
    # and a dataset never contains the sample scan made with a small plain seed.
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_phantom_dataset(
    out_dir: str | os.PathLike, num_cases: int, seed: int = 0, **make_kwargs: object
) -> Path:
    """Write phantoms as a Medical Segmentation Decathlon style dataset.

    Layout: `imagesTr/case_XXX.nii.gz`, `labelsTr/case_XXX.nii.gz` and `dataset.json`
    with relative paths, the modality ("CT") and the label names keyed by string ids.

    Args:
        out_dir: Dataset folder, created if needed.
        num_cases: Number of training cases.
        seed: Dataset seed; case seeds are derived from it and the case index.
        **make_kwargs: Passed to `make_phantom` (shape, spacing, orientation).

    Returns:
        Path of the written dataset.json.

    Raises:
        ValueError: If num_cases is below 1 or make_kwargs contains a seed.
    """
    if int(num_cases) < 1:
        raise ValueError(f"num_cases must be at least 1, got {num_cases}")
    if "seed" in make_kwargs:
        raise ValueError("pass the dataset seed as seed=; case seeds are derived from it")
    out = Path(out_dir)
    training = []
    for index in range(int(num_cases)):
        name = f"case_{index:03d}.nii.gz"
        phantom = make_phantom(seed=_case_seed(seed, index), **make_kwargs)
        save_phantom(phantom, out / "imagesTr" / name, out / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})

    dataset = {
        "name": "medvit_phantom",
        "description": f"Synthetic CT-like abdominal phantoms from medvit.pipelines.phantom (seed={seed})",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    return write_json(out / "dataset.json", dataset)
