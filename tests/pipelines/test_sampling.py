"""Trilinear sampling slab by slab: both samplers exact on a linear volume, and the class
arg-max sampler equal to sampling every class first."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import scan_affines
from medvit.pipelines.geometry import model_grid
from medvit.pipelines.sampling import _axis_aligned, class_argmax, sample_slab, sample_slab_argmax


def test_model_grids_keep_the_scans_directions_so_sampling_is_separable() -> None:
    """MONAI's Spacingd keeps the scan's direction cosines, so even the oblique scan maps onto its
    model grid axis by axis: the parity test below runs the separable sampler on all three."""
    for affine, axes in zip(scan_affines(), ([0, 1, 2], [0, 1, 2], [1, 2, 0])):
        model, _ = model_grid(affine, (23, 17, 11), (1.5, 1.5, 2.0))
        assert _axis_aligned(np.linalg.solve(affine, model)) == axes


@pytest.mark.parametrize("rotated", [False, True])
def test_trilinear_sampling_is_exact_on_a_linear_volume(rotated) -> None:
    """Both samplers (separable for axis-aligned maps, grid_sample otherwise) reproduce a
    linear volume exactly inside it, and clamp to its edge values outside."""
    idx = np.indices((20, 16, 12)).astype(np.float32)
    vol = torch.from_numpy(0.5 * idx[0] - 1.25 * idx[1] + 2.0 * idx[2] + 3.0)[None]
    m = np.diag([0.6, -0.7, 0.45, 1.0])
    m[:3, 3] = [1.3, 12.2, 0.4]
    if rotated:
        a = np.deg2rad(20)
        m[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ m[:3, :3]
    assert (_axis_aligned(m) is None) == rotated
    out = sample_slab(lambda lo, hi: vol[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], (20, 16, 12), m, (24, 15, 30), 5, 25)
    src = np.einsum("ab,bijk->aijk", m[:3, :3], np.indices((24, 15, 20)) + np.array([0, 0, 5])[:, None, None, None])
    src = src + m[:3, 3, None, None, None]
    clamped = np.stack([np.clip(src[a], 0, n - 1) for a, n in enumerate((20, 16, 12))])
    want = 0.5 * clamped[0] - 1.25 * clamped[1] + 2.0 * clamped[2] + 3.0
    np.testing.assert_allclose(out[0].numpy(), want, atol=2e-4)


def _maps() -> list[np.ndarray]:
    """Output voxel -> volume voxel: scaled with an offset, flipped and permuted, rotated."""
    scaled = np.diag([0.45, 0.6, 0.7, 1.0])
    scaled[:3, 3] = [0.3, -0.4, 1.1]
    permuted = np.array([[0, -0.55, 0, 14.0], [0, 0, 0.8, -0.2], [0.4, 0, 0, 0.6], [0, 0, 0, 1.0]])
    a = np.deg2rad(25)
    rotated = scaled.copy()
    rotated[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ scaled[:3, :3]
    return [scaled, permuted, rotated]


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_argmax_sampler_equals_sampling_every_class_first(index, ties) -> None:
    torch.manual_seed(index)
    prob = torch.rand(6, 16, 18, 12)
    if ties:  # few distinct values: classes tie, and neighbours often share their winner
        prob = (prob * 3).round() / 3
    box = lambda lo, hi: prob[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]  # noqa: E731
    shape = (30, 25, 17)
    for k0, k1 in ((0, 17), (4, 9)):
        want = class_argmax(sample_slab(box, prob.shape[1:], _maps()[index], shape, k0, k1))
        got = sample_slab_argmax(box, prob.shape[1:], _maps()[index], shape, k0, k1)
        assert got.shape == (30, 25, k1 - k0) and got.dtype == torch.uint8
        assert torch.equal(got, want)
        assert torch.equal(want.long(), sample_slab(box, prob.shape[1:], _maps()[index], shape, k0, k1).argmax(0))
