"""The MONAI-free model-space preprocessing equals MONAI's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map

from medvit.pipelines.geometry import model_grid, resample_scan
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
