"""The MONAI-free model-space preprocessing equals MONAI's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map

from medvit.pipelines.geometry import _axis_aligned, model_grid, resample_scan, sample_slab
from medvit.pipelines.intensity import scale_intensity
from medvit.pipelines.io import Scan
from medvit.pipelines.preprocessing import Preprocessing
from medvit.pipelines.stitch import gaussian_weights
from medvit.pipelines.transforms import preprocess_transforms


def _scan(affine: np.ndarray, shape=(23, 17, 11), dtype=np.int16, seed=0) -> Scan:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1500, size=shape).astype(dtype)
    array[:3] = 0  # zeros for the `mr` preset's non-zero mask
    return Scan(array=array, affine=affine, path=__import__("pathlib").Path("synthetic.nii.gz"))


def _affines() -> list[np.ndarray]:
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    lps[:3, 3] = [100.0, 120.0, -40.0]
    a = np.deg2rad(17)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([1.1, 0.9, 3.0])
    oblique[:3, 3] = [-20.0, 5.0, 7.5]
    permuted = np.array([[0, 0, 2.0, 1.0], [1.5, 0, 0, -3.0], [0, -1.2, 0, 4.0], [0, 0, 0, 1]])
    return [lps, oblique, permuted]


def test_model_grids_keep_the_scans_directions_so_sampling_is_separable() -> None:
    """MONAI's Spacingd keeps the scan's direction cosines, so even the oblique scan maps onto its
    model grid axis by axis: the parity test below runs the separable sampler on all three."""
    for affine, axes in zip(_affines(), ([0, 1, 2], [0, 1, 2], [1, 2, 0])):
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


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("spacing,intensity", [((1.5, 1.5, 2.0), "ct"), (None, "mr"), ((2.0, 1.0, 1.7), "none")])
def test_model_space_equals_monai_transforms(index, spacing, intensity) -> None:
    scan = _scan(_affines()[index])
    prep = Preprocessing(spacing=spacing, intensity=intensity)
    ref = preprocess_transforms(prep, keys=("image",))({"image": scan})["image"]
    affine, shape = model_grid(scan.affine, scan.shape, prep.spacing, prep.orientation)
    assert shape == tuple(ref.shape[1:])
    np.testing.assert_allclose(affine, np.asarray(ref.affine), atol=1e-6)
    ours = scale_intensity(resample_scan(scan.array, affine, scan.affine, shape, budget=200), intensity, prep.ct_window)
    tol = 1e-4 if intensity != "none" else 1e-2  # raw HU
    torch.testing.assert_close(ours, ref.as_tensor(), atol=tol, rtol=1e-5)


def test_gaussian_weights_equal_monais() -> None:
    for roi in [(96, 96, 96), (32, 24, 16), (64, 64)]:
        ref = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device="cpu")
        torch.testing.assert_close(gaussian_weights(roi), ref)
