"""Perturbed copies of a scan at increasing severity, for robustness curves.

Each perturbation has six severity levels, 0 to `MAX_LEVEL`; level 0 is the identity (the
scan's own array, untouched) and each level names one physical parameter:

| name | parameter per level 0..5 | what it imitates |
| --- | --- | --- |
| `noise` | Gaussian noise sigma 0, 10, 20, 40, 60, 80 (intensity units: HU on CT) | a lower dose |
| `blur` | Gaussian smoothing sigma 0, 0.5, 1, 2, 3, 4 mm | a softer reconstruction kernel |
| `contrast` | scale 1, 0.9, 0.8, 0.65, 0.5, 0.35 about the window's centre | weaker contrast enhancement |
| `gamma` | gamma 1, 1.2, 1.4, 1.7, 2, 2.5 on the window, mapped back | another display / reconstruction curve |
| `rotation` | 0, 5, 10, 15, 20, 30 degrees about the superior-inferior axis | the patient turned on the table |
| `resolution` | voxels 1, 2, 3, 4, 5, 6 times larger along every axis, then back | thicker slices, a coarser matrix |

Every perturbed scan keeps the original grid (shape and affine), so the reference labels
still apply; only `rotation` moves them, with exactly the same transform (nearest
neighbour for the labels, linear for the image). Noise is drawn from a seed, so a copy
is the same on every run; everything else is deterministic. Arrays are float32 (the
labels keep their dtype).

The window of `contrast` and `gamma` is the model's intensity window (the `ct` preset's
HU window) when the caller gives one, else the scan's 0.5 and 99.5 percentiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medvit.pipelines.errors import MedvitError
from medvit.pipelines.io import Scan

__all__ = ["MAX_LEVEL", "PERTURBATIONS", "Perturbation", "check_levels", "check_perturbations", "perturb"]

MAX_LEVEL = 5
# Percentiles of the scan that make the window when the model gives none.
_WINDOW_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Perturbation:
    """One kind of perturbation: its parameter at each level, and what it does.

    Attributes:
        name: The name `--perturb` takes.
        parameter: The parameter's name, with its unit (``sigma_hu``, ``degrees``).
        values: The parameter at levels 0..`MAX_LEVEL` (level 0 is the identity).
        description: One line: what is changed, and what that imitates.
        moves_labels: Whether the labels move with the image (geometric perturbations).
    """

    name: str
    parameter: str
    values: tuple[float, ...]
    description: str
    moves_labels: bool = False


PERTURBATIONS: dict[str, Perturbation] = {
    p.name: p
    for p in (
        Perturbation("noise", "sigma_hu", (0.0, 10.0, 20.0, 40.0, 60.0, 80.0),
                     "additive Gaussian noise of sigma (HU on CT), from a fixed seed: a lower dose"),
        Perturbation("blur", "sigma_mm", (0.0, 0.5, 1.0, 2.0, 3.0, 4.0),
                     "Gaussian smoothing of sigma mm along every axis: a softer reconstruction kernel"),
        Perturbation("contrast", "scale", (1.0, 0.9, 0.8, 0.65, 0.5, 0.35),
                     "intensities scaled about the window's centre: weaker contrast"),
        Perturbation("gamma", "gamma", (1.0, 1.2, 1.4, 1.7, 2.0, 2.5),
                     "the window's range mapped through t**gamma and back; outside it unchanged"),
        Perturbation("rotation", "degrees", (0.0, 5.0, 10.0, 15.0, 20.0, 30.0),
                     "turned about the superior-inferior axis through the volume's centre, on the same grid",
                     moves_labels=True),
        Perturbation("resolution", "factor", (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
                     "averaged over blocks of factor^3 voxels, then interpolated back (linear) to the grid"),
    )
}  # fmt: skip


def check_perturbations(names: Sequence[str]) -> list[str]:
    """The names, checked against `PERTURBATIONS` (duplicates dropped, order kept).

    Raises:
        MedvitError: An unknown name, or none given.
    """
    if not names:
        raise MedvitError(f"no perturbation given; choose from {', '.join(PERTURBATIONS)}")
    unknown = [n for n in names if n not in PERTURBATIONS]
    if unknown:
        raise MedvitError(f"unknown perturbation(s) {', '.join(unknown)}; choose from {', '.join(PERTURBATIONS)}")
    return list(dict.fromkeys(names))


def check_levels(levels: Sequence[int]) -> list[int]:
    """The levels, sorted and without duplicates.

    Raises:
        MedvitError: A level outside 0..`MAX_LEVEL`, or none given.
    """
    if not levels:
        raise MedvitError(f"no severity level given; levels are 0 (none) to {MAX_LEVEL}")
    bad = [v for v in levels if int(v) != v or not 0 <= v <= MAX_LEVEL]
    if bad:
        raise MedvitError(f"severity level(s) {', '.join(map(str, bad))} out of range; levels are 0 to {MAX_LEVEL}")
    return sorted({int(v) for v in levels})


def perturb(
    scan: Scan,
    labels: np.ndarray | None,
    name: str,
    level: int,
    seed: int | Sequence[int] = 0,
    window: tuple[float, float] | None = None,
) -> tuple[Scan, np.ndarray | None]:
    """A copy of `scan` perturbed by `name` at severity `level`, on the scan's own grid.

    Args:
        scan: The scan (its array is not changed).
        labels: Its label map on the same grid, or None; moved only by geometric
            perturbations (`rotation`), returned as given otherwise.
        name: A key of `PERTURBATIONS`.
        level: Severity, 0 (the scan itself) to `MAX_LEVEL`.
        seed: Seed of the noise (with the level: each level draws its own noise).
        window: Intensity window (low, high) of `contrast` and `gamma`; None uses the
            scan's 0.5 and 99.5 percentiles.

    Returns:
        The perturbed scan (same path, affine and header; float32 array, or the scan
        itself at level 0) and the labels on the same grid.

    Raises:
        MedvitError: An unknown perturbation or a level out of range.
    """
    check_perturbations([name])
    check_levels([level])
    value = PERTURBATIONS[name].values[level]
    if level == 0:
        return scan, labels
    image = np.asarray(scan.array, dtype=np.float32)
    if name == "rotation":
        image, labels = rotate(image, labels, scan.affine, value)
    else:
        seeds = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(v) for v in seed]
        image = _change_intensities(name, image, value, scan, [*seeds, level], window)
    return dataclasses.replace(scan, array=image), labels


def add_noise(image: np.ndarray, sigma: float, seed: int | Sequence[int]) -> np.ndarray:
    """`image` plus Gaussian noise of standard deviation `sigma`, drawn from `seed`."""
    noise = np.random.default_rng(seed).standard_normal(image.shape, dtype=np.float32)
    return image + np.float32(sigma) * noise


def blur(image: np.ndarray, sigma_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Gaussian smoothing of `sigma_mm` along every axis (voxel sizes `spacing`), edges repeated."""
    sigma = [sigma_mm / float(s) for s in spacing]
    return ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")


def scale_contrast(image: np.ndarray, scale: float, window: tuple[float, float]) -> np.ndarray:
    """`centre + scale * (image - centre)`, the centre being the window's middle."""
    centre = np.float32((window[0] + window[1]) / 2.0)
    return centre + np.float32(scale) * (image - centre)


def apply_gamma(image: np.ndarray, gamma: float, window: tuple[float, float]) -> np.ndarray:
    """Inside the window, `low + (high - low) * t**gamma` with `t` the position in it (0..1);
    outside the window, unchanged (the mapping is continuous and monotonic)."""
    lo, hi = (np.float32(v) for v in window)
    out = image.copy()
    inside = (image > lo) & (image < hi)
    t = (image[inside] - lo) / (hi - lo)
    out[inside] = lo + (hi - lo) * t ** np.float32(gamma)
    return out


def rotate(
    image: np.ndarray, labels: np.ndarray | None, affine: np.ndarray, degrees: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Turn the content by `degrees` about the world superior-inferior axis through the grid's centre.

    Positive angles turn the anatomy counter-clockwise seen from above (from R towards A, in
    RAS); on an RAS grid with square voxels, 90 degrees is `np.rot90` over axes (0, 1). The
    image is interpolated linearly, the labels by nearest neighbour, on the same grid;
    voxels turned in from outside the field of view take the image's minimum (air on CT)
    and label 0.
    """
    theta = np.deg2rad(degrees)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0.0], [np.sin(theta), np.cos(theta), 0.0], [0.0, 0.0, 1.0]])
    affine = np.asarray(affine, dtype=float)
    centre = affine[:3, :3] @ ((np.asarray(image.shape, dtype=float) - 1.0) / 2.0) + affine[:3, 3]
    # Output voxel v shows the source at A^-1 (R^T (A v - c) + c).
    world = np.eye(4)
    world[:3, :3] = rot.T
    world[:3, 3] = centre - rot.T @ centre
    # Rounded to 1e-9 voxel: a right angle then maps edge voxels exactly onto edge voxels
    # (a -1e-15 coordinate would count as outside the grid and take the fill value).
    matrix = np.round(np.linalg.solve(affine, world @ affine), 9)
    fill = float(image.min()) if image.size else 0.0
    moved = ndimage.affine_transform(image, matrix[:3, :3], matrix[:3, 3], order=1, mode="constant", cval=fill)
    if labels is not None:
        labels = ndimage.affine_transform(labels, matrix[:3, :3], matrix[:3, 3], order=0, mode="constant", cval=0)
    return moved, labels


def lower_resolution(image: np.ndarray, factor: int) -> np.ndarray:
    """Average blocks of `factor` voxels along every axis (voxels `factor` times larger, their edges
    on the grid's), then interpolate linearly back to the grid, as a thick-slice scan resampled
    onto a fine grid. The last block of an axis the factor does not divide repeats the edge."""
    f = int(factor)
    if f <= 1:
        return image.copy()
    shape = image.shape
    padded = np.pad(image, [(0, -n % f) for n in shape], mode="edge")
    coarse = padded.reshape([v for n in padded.shape for v in (n // f, f)]).mean(axis=(1, 3, 5), dtype=np.float32)
    # grid_mode: the coarse and fine voxels' edges coincide (not their centres).
    fine = ndimage.zoom(coarse, f, order=1, mode="nearest", grid_mode=True)
    return np.ascontiguousarray(fine[tuple(slice(0, n) for n in shape)])


def scan_window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    """`window`, or the image's 0.5 and 99.5 percentiles (widened when they are equal)."""
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
    else:
        lo, hi = (float(v) for v in np.percentile(image, _WINDOW_PERCENTILES))
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def _change_intensities(
    name: str, image: np.ndarray, value: float, scan: Scan, seeds: list[int], window: tuple[float, float] | None
) -> np.ndarray:
    if name == "noise":
        return add_noise(image, value, seeds)
    if name == "blur":
        return blur(image, value, scan.spacing)
    if name == "contrast":
        return scale_contrast(image, value, scan_window(image, window))
    if name == "gamma":
        return apply_gamma(image, value, scan_window(image, window))
    return lower_resolution(image, int(value))
