"""Perturbations of a scan: identity at level 0, and each level's physical parameter measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medvit.pipelines.errors import MedvitError
from medvit.pipelines.io import Scan, read_scan
from medvit.pipelines.perturb import MAX_LEVEL, PERTURBATIONS, check_levels, lower_resolution, perturb, rotate


def _scan(array: np.ndarray, spacing=(1.0, 1.0, 2.0)) -> Scan:
    return Scan(array=array, affine=np.diag([*spacing, 1.0]), path=Path("synthetic.nii.gz"))


@pytest.fixture(scope="module")
def phantom(phantom_scan) -> tuple[Scan, np.ndarray]:
    img, lab = phantom_scan
    return read_scan(img), np.asarray(read_scan(lab).array)


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_level_zero_is_the_identity_and_levels_are_deterministic(phantom, name) -> None:
    scan, labels = phantom
    same, same_labels = perturb(scan, labels, name, 0)
    np.testing.assert_array_equal(same.array, scan.array)
    np.testing.assert_array_equal(same_labels, labels)
    first, first_labels = perturb(scan, labels, name, 2, seed=7)
    again, again_labels = perturb(scan, labels, name, 2, seed=7)
    np.testing.assert_array_equal(first.array, again.array)
    np.testing.assert_array_equal(first_labels, again_labels)
    # the copy keeps the grid; the scan itself is untouched
    assert first.shape == scan.shape and np.array_equal(first.affine, scan.affine)
    assert not np.array_equal(first.array, scan.array)
    assert first.array.dtype == np.float32 and scan.array.dtype == np.int16
    if not PERTURBATIONS[name].moves_labels:
        assert first_labels is labels


def test_noise_std_is_the_levels_sigma(phantom) -> None:
    scan, _ = phantom
    base = scan.array.astype(np.float32)
    for level in range(1, MAX_LEVEL + 1):
        sigma = PERTURBATIONS["noise"].values[level]
        noisy, _ = perturb(scan, None, "noise", level, seed=3)
        diff = noisy.array - base
        assert abs(float(diff.mean())) < 0.03 * sigma
        assert float(diff.std()) == pytest.approx(sigma, rel=0.02), level
    other, _ = perturb(scan, None, "noise", 1, seed=4)
    assert not np.array_equal(other.array, perturb(scan, None, "noise", 1, seed=3)[0].array)


def _high_frequency_energy(a: np.ndarray) -> float:
    """Energy of the voxel-to-voxel differences along every axis."""
    return float(sum(np.square(np.diff(a, axis=k)).sum() for k in range(3)))


def test_blur_lowers_high_frequency_energy_at_every_level(phantom) -> None:
    scan, _ = phantom
    energies = [_high_frequency_energy(perturb(scan, None, "blur", lv)[0].array.astype(np.float64))
                for lv in range(MAX_LEVEL + 1)]  # fmt: skip
    assert all(b < a for a, b in zip(energies, energies[1:])), energies
    assert energies[-1] < 0.25 * energies[0]  # 4 mm on 3 mm voxels


def test_blur_sigma_is_in_millimetres() -> None:
    """An impulse blurred by sigma mm has that standard deviation along each axis, whatever the spacing."""
    impulse = np.zeros((41, 41, 41), np.float32)
    impulse[20, 20, 20] = 1.0
    level = 4  # 3 mm
    blurred, _ = perturb(_scan(impulse, (1.0, 0.5, 1.5)), None, "blur", level)
    sigma_mm = PERTURBATIONS["blur"].values[level]
    for axis, spacing in enumerate((1.0, 0.5, 1.5)):
        profile = blurred.array.sum(axis=tuple(a for a in range(3) if a != axis)).astype(np.float64)
        x = (np.arange(41) - 20) * spacing
        assert np.sqrt((profile * x**2).sum() / profile.sum()) == pytest.approx(sigma_mm, rel=0.05)


def test_contrast_and_gamma_about_the_window() -> None:
    hu = np.linspace(-300, 400, 8 * 6 * 5, dtype=np.float32).reshape(8, 6, 5)
    window = (-175.0, 250.0)
    centre = sum(window) / 2
    for level in range(1, MAX_LEVEL + 1):
        low, _ = perturb(_scan(hu), None, "contrast", level, window=window)
        scale = PERTURBATIONS["contrast"].values[level]
        np.testing.assert_allclose(low.array - centre, scale * (hu - centre), rtol=1e-5, atol=1e-3)
        bent, _ = perturb(_scan(hu), None, "gamma", level, window=window)
        g = PERTURBATIONS["gamma"].values[level]
        inside = (hu > window[0]) & (hu < window[1])
        t = (hu[inside] - window[0]) / (window[1] - window[0])
        np.testing.assert_allclose(bent.array[inside], window[0] + (window[1] - window[0]) * t**g, rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(bent.array[~inside], hu[~inside])  # unchanged outside the window
        assert np.all(np.diff(bent.array.ravel()) >= 0)  # still monotonic
    # without a window, the scan's own 0.5-99.5 percentiles
    plain, _ = perturb(_scan(hu), None, "gamma", 5)
    lo, hi = np.percentile(hu, (0.5, 99.5))
    assert plain.array.min() == hu.min() and np.all(plain.array[(hu > lo) & (hu < hi)] <= hu[(hu > lo) & (hu < hi)])


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.0, 3.0, 1.0]), np.diag([-2.0, -2.0, 3.0, 1.0])],
                         ids=["RAS", "LPS"])  # fmt: skip
def test_rotation_by_90_degrees_is_rot90(affine) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 16, 5)).astype(np.float32)
    labels = rng.integers(0, 4, size=(16, 16, 5)).astype(np.uint8)
    moved, moved_labels = rotate(image, labels, affine, 90.0)
    np.testing.assert_allclose(moved, np.rot90(image, 1, axes=(0, 1)), atol=1e-5)
    np.testing.assert_array_equal(moved_labels, np.rot90(labels, 1, axes=(0, 1)))


def test_rotation_moves_labels_with_the_image(phantom) -> None:
    scan, labels = phantom
    level = 3
    moved, moved_labels = perturb(scan, labels, "rotation", level)
    degrees = PERTURBATIONS["rotation"].values[level]
    assert moved_labels.dtype == labels.dtype and set(np.unique(moved_labels)) <= set(np.unique(labels))
    # every organ keeps its volume (nearest neighbour, nothing leaves the field of view)...
    for label in (1, 2):
        assert (moved_labels == label).sum() == pytest.approx((labels == label).sum(), rel=0.03)
    # ...and its centre turns by the angle about the grid's centre, in world millimetres
    centre_vox = (np.asarray(labels.shape) - 1) / 2
    theta = np.deg2rad(degrees)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    for label in (1, 2):
        before = scan.affine[:3, :3] @ (np.argwhere(labels == label).mean(0) - centre_vox)
        after = scan.affine[:3, :3] @ (np.argwhere(moved_labels == label).mean(0) - centre_vox)
        np.testing.assert_allclose(after[:2], rot @ before[:2], atol=2.0)
        assert after[2] == pytest.approx(before[2], abs=0.5)
    # the moved image still shows the organ under the moved label: the liver's HU
    assert abs(float(np.median(moved.array[moved_labels == 1])) - float(np.median(scan.array[labels == 1]))) < 10


@pytest.mark.parametrize("factor", [2, 3, 5])
def test_resolution_spreads_an_impulse_over_the_factor(factor) -> None:
    """Block means of factor^3 voxels, linear back: an impulse spreads over the voxels within one coarse
    voxel of its block's centre (2 * factor - 1 per axis for odd factors, 2 * factor for even ones),
    keeps its total, and at the centre of an odd block keeps 1/factor^3."""
    n = 5 * factor
    impulse = np.zeros((n, n, n), np.float32)
    c = 2 * factor + factor // 2  # the centre voxel of block 2 (odd factors), or the first voxel past it
    impulse[c, c, c] = 1.0
    level = PERTURBATIONS["resolution"].values.index(float(factor))
    out, _ = perturb(_scan(impulse), None, "resolution", level)
    support = np.argwhere(out.array > 1e-7)
    extent = support.max(0) - support.min(0) + 1
    assert np.all(extent == 2 * factor - factor % 2), extent
    assert float(out.array.sum()) == pytest.approx(1.0, rel=1e-5)
    if factor % 2:
        assert float(out.array[c, c, c]) == pytest.approx(1.0 / factor**3, rel=1e-5)


def test_resolution_keeps_a_linear_ramp_and_the_grid() -> None:
    ramp = np.arange(24, dtype=np.float32)[:, None, None] * np.ones((24, 13, 7), np.float32)
    for factor in (2, 3, 4):
        out = lower_resolution(ramp, factor)
        assert out.shape == ramp.shape
        # block means of a ramp are its values at the block centres, and linear interpolation
        # reproduces it exactly away from the edges (only if the coarse grid's edges are the fine one's)
        np.testing.assert_allclose(out[factor:-factor], ramp[factor:-factor], atol=1e-4)


def test_bad_names_and_levels_are_user_errors(phantom) -> None:
    scan, _ = phantom
    with pytest.raises(MedvitError, match="unknown perturbation.*noise"):
        perturb(scan, None, "sharpen", 1)
    with pytest.raises(MedvitError, match="0 to 5"):
        perturb(scan, None, "noise", 6)
    assert check_levels([3, 0, 3]) == [0, 3]


def test_cli_lists_the_perturbations() -> None:
    from medvit.cli.evaluate import MAX_LEVEL as CLI_MAX_LEVEL
    from medvit.cli.evaluate import PERTURBATION_NAMES

    assert PERTURBATION_NAMES == tuple(PERTURBATIONS) and CLI_MAX_LEVEL == MAX_LEVEL
    assert all(len(p.values) == MAX_LEVEL + 1 for p in PERTURBATIONS.values())
