"""Training recipes: named sets of augmentation strengths, crop sampling and LR schedule.

`medvit train --recipe NAME` picks one; `default` is `strong`, an augmentation and
sampling scheme after nnU-Net's (Isensee et al., "nnU-Net: a self-configuring method for
deep learning-based biomedical image segmentation", Nature Methods 2021): rotation and
scaling 0.7-1.4, Gaussian noise and blur, brightness, contrast, simulated low resolution,
gamma (also on the inverted image), mirroring, and crops that give every foreground class
the same share, with negatives drawn from the whole scan. `light` is the earlier scheme
(small affine, small intensity jitter, flips on every axis), kept for comparison.

This module holds only the numbers (no MONAI import, so the CLI can list the names
cheaply); `medvit.pipelines.augment` turns a recipe into MONAI transforms.

Mirroring rule: a flip across the body's left-right axis turns a left kidney into a
right-looking one while its label still says "left". Recipes with `mirror="lr-safe"`
therefore never flip that axis when any label name is lateralised (see
:func:`is_lateralised`); the other axes are flipped. Flipping and swapping the paired
labels would double the data but needs every pair to be named consistently; not flipping
is always correct.

Schedule: the LR factor is a function of the step and the run's total steps, so the same
recipe suits a 240-step CPU run and a 250k-step GPU run. `cosine` (linear warmup, then
cosine to 0) is the default: vision transformers trained with AdamW need the warmup (their
attention logits blow up under a full early LR), and cosine is what UNETR, Swin-UNETR and
most ViT work were tuned with. `poly` (warmup, then nnU-Net's `(1 - t)^0.9`) decays almost
linearly and spends more of a short budget at a mid-range LR; `strong-poly` selects it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from medvit.optim.schedule import SCHEDULES, schedule_factor
from medvit.pipelines.errors import MedvitError

SAMPLERS = ("classes", "posneg")
MIRRORS = ("lr-safe", "all", "none")
DEFAULT_RECIPE = "strong"


@dataclass(frozen=True)
class Recipe:
    """Augmentation strengths, crop sampling and schedule of a training run.

    Probabilities are per sample. Zoom ranges are scale factors (1 = unchanged).

    Attributes:
        name: Registry name.
        summary: One line for `--help` and the README.
        sampler: `classes` (crop centres on each foreground class in equal shares, the rest
            on background voxels anywhere in the scan; MONAI `RandCropByLabelClassesd`) or
            `posneg` (foreground / background inside the body; `RandCropByPosNegLabeld`).
        fg_fraction: Share of crops centred on a foreground voxel.
        crop_to_body: Crop volumes to the body's bounding box before sampling (then no crop
            shows what lies outside the body, e.g. the table).
        mirror: `lr-safe` (every axis, except left-right when labels are lateralised),
            `all` (every axis) or `none`.
        mirror_prob: Flip probability per axis.
        affine_prob: Probability of a random rotation + scaling.
        rotate_deg: Largest rotation (about every axis for 3D models, in-plane for 2D).
        zoom: Scale factor range of the affine.
        margin: Crops are sampled this fraction larger along every augmented axis and
            centre-cropped after the spatial transforms, so rotated and zoomed-out crops
            show real anatomy at their borders instead of padding.
        elastic_prob: Probability of an elastic deformation (MONAI `Rand3DElasticd`,
            `Rand2DElasticd` for 2D models); slow on CPUs, off in the named recipes.
        noise_prob: Probability of additive Gaussian noise.
        noise_std: Largest noise standard deviation (drawn uniformly from [0, noise_std]).
        smooth_prob: Probability of a Gaussian blur.
        smooth_sigma: Blur sigma range, in voxels.
        brightness_prob: Probability of a multiplicative brightness change.
        brightness: Brightness factor range is 1 +/- this.
        shift_prob: Probability of an additive intensity shift.
        shift: Shift range is +/- this.
        contrast_prob: Probability of a contrast change about the mean (range kept).
        contrast: Contrast factor range is 1 +/- this.
        lowres_prob: Probability of simulated low resolution (down- then up-sampling).
        lowres_zoom: Down-sampling factor range.
        gamma_prob: Probability of a gamma change (mean and std kept).
        gamma_inverted_prob: Probability of a gamma change on the inverted image.
        gamma: Gamma range.
        schedule: `cosine` or `poly` (both after a linear warmup).
    """

    name: str
    summary: str
    sampler: str = "classes"
    fg_fraction: float = 0.5
    crop_to_body: bool = False
    mirror: str = "lr-safe"
    mirror_prob: float = 0.5
    affine_prob: float = 0.3
    rotate_deg: float = 30.0
    zoom: tuple[float, float] = (0.7, 1.4)
    margin: float = 0.25
    elastic_prob: float = 0.0
    noise_prob: float = 0.1
    noise_std: float = 0.1
    smooth_prob: float = 0.2
    smooth_sigma: tuple[float, float] = (0.5, 1.0)
    brightness_prob: float = 0.15
    brightness: float = 0.25
    shift_prob: float = 0.0
    shift: float = 0.0
    contrast_prob: float = 0.15
    contrast: float = 0.25
    lowres_prob: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    gamma_prob: float = 0.3
    gamma_inverted_prob: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        for value, allowed, what in (
            (self.sampler, SAMPLERS, "sampler"), (self.mirror, MIRRORS, "mirror"), (self.schedule, SCHEDULES, "schedule")
        ):
            if value not in allowed:
                raise MedvitError(f"recipe {self.name!r}: {what} must be one of {', '.join(allowed)}, got {value!r}")
        if not 0.0 <= self.fg_fraction <= 1.0:
            raise MedvitError(f"recipe {self.name!r}: fg_fraction must be in [0, 1], got {self.fg_fraction}")
        if not 0.0 < self.zoom[0] <= self.zoom[1]:
            raise MedvitError(f"recipe {self.name!r}: zoom must be a range of positive factors, got {self.zoom}")


STRONG = Recipe(
    name="strong",
    summary="nnU-Net-like: rotation, scaling 0.7-1.4, noise, blur, brightness, contrast, low resolution, "
    "gamma, mirroring (never left-right with lateralised labels), class-balanced crops, warmup + cosine",
)
RECIPES: dict[str, Recipe] = {
    "strong": STRONG,
    "strong-poly": replace(STRONG, name="strong-poly", summary="strong with warmup + poly (1 - t)^0.9 decay",
                           schedule="poly"),
    "light": Recipe(
        name="light",
        summary="the earlier scheme: body crop, 2:1 foreground crops, flips on every axis, "
        "rotation 15 deg, scaling 0.9-1.1, small intensity scale and shift, warmup + cosine",
        sampler="posneg", fg_fraction=0.67, crop_to_body=True, mirror="all", affine_prob=0.3, rotate_deg=15.0,
        zoom=(0.9, 1.1), margin=0.0, noise_prob=0.0, smooth_prob=0.0, brightness_prob=0.5, brightness=0.1,
        shift_prob=0.5, shift=0.1, contrast_prob=0.0, lowres_prob=0.0, gamma_prob=0.0, gamma_inverted_prob=0.0,
    ),
}


def recipe_names() -> list[str]:
    """Names `get_recipe` accepts (`default` first)."""
    return ["default", *RECIPES]


def get_recipe(name: str) -> Recipe:
    """The recipe registered as `name` (`default` is `strong`).

    Raises:
        MedvitError: No recipe of that name.
    """
    key = DEFAULT_RECIPE if name == "default" else name
    if key not in RECIPES:
        raise MedvitError(f"unknown training recipe {name!r} (known: {', '.join(recipe_names())})")
    return RECIPES[key]


_SIDE_WORDS = re.compile(r"left|right", re.IGNORECASE)
_SIDE_TOKENS = {"l", "r", "lt", "rt", "sin", "dex"}


def is_lateralised(name: str) -> bool:
    """Whether a label name names one side of the body (`kidney_left`, `LeftLung`, `adrenal_l`)."""
    if _SIDE_WORDS.search(name):
        return True
    return any(token.lower() in _SIDE_TOKENS for token in re.split(r"[\s_.\-/]+", name))


def mirror_axes(recipe: Recipe, label_names: Iterable[str], orientation: str = "RAS") -> list[int]:
    """Spatial axes the recipe may flip, for volumes in `orientation` with these labels."""
    if recipe.mirror == "none" or recipe.mirror_prob <= 0:
        return []
    axes = [0, 1, 2]
    if recipe.mirror == "lr-safe" and any(is_lateralised(n) for n in label_names):
        axes.remove(left_right_axis(orientation))
    return axes


def left_right_axis(orientation: str) -> int:
    """The array axis running left-right in volumes with these axis codes (0 for RAS)."""
    for axis, code in enumerate(orientation.upper()):
        if code in "LR":
            return axis
    raise MedvitError(f"orientation {orientation!r} has no left-right axis")


def lr_lambda(schedule: str, total: int, warmup: int) -> Callable[[int], float]:
    """`schedule_factor` as a `LambdaLR` function."""
    if schedule not in SCHEDULES:
        raise MedvitError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return lambda step: schedule_factor(schedule, step, total, warmup)


def enlarged(size: Sequence[int], margin: float, axes: Sequence[int]) -> list[int]:
    """`size` grown by `margin` along `axes`, by an even number of voxels (so the centre crop
    back to `size` falls on whole voxels)."""
    out = list(size)
    for a in axes:
        out[a] += 2 * math.ceil(margin * size[a] / 2)
    return out
