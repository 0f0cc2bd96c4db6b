"""Planning: the target spacing and training patch size a dataset's fingerprint suggests.

The rule follows nnU-Net (Isensee et al., Nature Methods 2021), with patch sizes kept to
multiples of the ViT patch size.
"""

from __future__ import annotations

import numpy as np

from medvit.pipelines.errors import DatasetError

__all__ = ["MAX_PATCH_VOXELS", "PATCH_MULTIPLE", "patch_size", "plan_from_fingerprint"]

# A dataset whose coarsest median spacing exceeds the finest by this factor is anisotropic.
ANISOTROPY_RATIO = 3.0
# Default patch cap (what a UNETR at 96^3 trains with) and the ViT patch size.
MAX_PATCH_VOXELS = 96**3
PATCH_MULTIPLE = 16


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

    patch = patch_size(median_shape, median_spacing, target, max_patch_voxels, patch_multiple)
    return {"spacing": [float(s) for s in target], "patch_size": patch}


def patch_size(
    median_shape: np.ndarray,
    median_spacing: np.ndarray,
    target: np.ndarray,
    max_voxels: int = MAX_PATCH_VOXELS,
    multiple: int = PATCH_MULTIPLE,
) -> list[int]:
    """The training patch for a target spacing: steps 2-4 of :func:`plan_from_fingerprint`."""
    extent = np.asarray(median_shape, dtype=np.float64) * np.asarray(median_spacing) / np.asarray(target)
    # The epsilon keeps 63.99999 (a float artefact of an exact 64) from rounding down to 48.
    patch = [max(multiple, int((n + 1e-6) // multiple) * multiple) for n in extent]
    while int(np.prod(patch)) > max_voxels:
        axis = int(np.argmax(patch))
        patch[axis] = max(multiple, patch[axis] - multiple)
    return patch
