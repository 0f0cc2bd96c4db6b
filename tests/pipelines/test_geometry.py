"""The MONAI-free model-space preprocessing equals MONAI's transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map

from helpers import scan_affines
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


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("spacing,intensity", [((1.5, 1.5, 2.0), "ct"), (None, "mr"), ((2.0, 1.0, 1.7), "none")])
def test_model_space_equals_monai_transforms(index, spacing, intensity) -> None:
    scan = _scan(scan_affines()[index])
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
