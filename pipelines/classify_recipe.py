"""Training recipes for classification: DeiT's and the AugReg grid, and their building blocks.

The numbers, as data:

- `deit`: Touvron et al., "Training data-efficient image transformers & distillation
  through attention", ICML 2021, Table 9 (and the defaults of its `main.py`): RandAugment
  2 ops at magnitude 9 (`rand-m9-mstd0.5-inc1`), Mixup alpha 0.8, CutMix alpha 1.0 (one of
  them on every batch, CutMix half the time), label smoothing 0.1, random erasing 0.25,
  repeated augmentation x3, stochastic depth 0.1, no dropout, AdamW at 5e-4 x batch / 512,
  weight decay 0.05, 5 warmup epochs, cosine, 300 epochs. EMA is off: the paper finds its
  gain vanishes after fine-tuning.
- `baseline`: DeiT's optimiser and schedule with every augmentation and regulariser off
  (random resized crop and flip stay).
- `augreg-<aug>-<reg>`: Steiner et al., "How to train your ViT? Data, Augmentation, and
  Regularization in Vision Transformers", TMLR 2022, as big_vision's `configs/vit_i1k.py`
  writes them (`RANDAUG_DEF`, `MIXUP_DEF`): <aug> is `none`, `light1` RA(2,0), `light2`
  RA(2,10) + Mixup 0.2, `medium1` RA(2,15) + Mixup 0.2, `medium2` RA(2,15) + Mixup 0.5,
  `strong1` RA(2,20) + Mixup 0.5, `strong2` RA(2,20) + Mixup 0.8 (no CutMix); <reg> is
  `none` or `reg` (dropout 0.1 + stochastic depth 0.1, the checkpoints' `do_0.1-sd_0.1`).
  The presets vary these two axes only, on the `baseline` optimiser and schedule.

RandAugment magnitudes are on the 0..10 scale of the TF and timm implementations the papers
used (`randaug(2,15)`, `rand-m9`): `LevelRandAugment`. DeiT samples the magnitude around 9
with std 0.5 (`mstd0.5`); here it is fixed. `inc1` (posterize and solarize growing stronger
with the magnitude) is what torchvision's RandAugment does.

Kinds of input: `image` (C, H, W) float in [0, 1], 1 or 3 channels; `video` (C, T, H, W),
the layout of medvit's video models, where every frame gets the same crop, flip, RandAugment
ops and erased box (torchvision applies one draw to a `tv_tensors.Video`); `volume`
(C, D, H, W), where RandAugment (a 2D policy) and random erasing do not apply: flips on the
recipe's axes, a small rotation / scaling and intensity jitter (MONAI), and Mixup / CutMix
with a 3D box on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from medvit.losses import HardDistillationLoss
from medvit.optim.factory import OPTIMIZERS
from medvit.optim.schedule import SCHEDULES
from medvit.pipelines.errors import MedvitError

KINDS = ("image", "video", "volume")


@dataclass(frozen=True)
class ClassifyRecipe:
    """Augmentation, regularisation and optimisation of a classification run (DeiT's defaults).

    Attributes:
        name: Registry name.
        randaug_ops: RandAugment's ops per sample.
        randaug_magnitude: RandAugment's magnitude on the 0..10 scale (above 10 allowed, see
            `LevelRandAugment`); None turns RandAugment off.
        mixup_alpha: Mixup's Beta(alpha, alpha); 0 turns it off.
        cutmix_alpha: CutMix's Beta(alpha, alpha); 0 turns it off.
        mix_prob: Probability that a batch is mixed at all.
        switch_prob: Probability of CutMix rather than Mixup when both are on.
        label_smoothing: Label smoothing of the (mixed) targets.
        random_erasing: Probability of erasing a random box (images and video).
        repeated_aug: Copies of each sample per epoch (`RepeatedAugmentationSampler`); 1 = off.
        drop_path_rate: Stochastic depth of the model.
        dropout: Dropout after the position embedding and every projection (ViT's); 0 = off.
        hflip: Horizontal flip probability (images and video).
        crop_scale: Area range of the random resized crop (images and video).
        eval_crop: Centre-crop fraction at evaluation (the image is resized to size / this).
        volume_flip_axes: Spatial axes a volume is flipped along (each with probability 0.5);
            leave out the left-right axis when the classes are lateralised.
        optimizer: One of `medvit.optim.OPTIMIZERS` (`adamw`, `sgd`, `adafactor`, `adafactor_vit`).
        lr: Learning rate at `lr_batch` samples per step (scaled linearly, `scaled_lr`).
        lr_batch: Batch size `lr` is given for.
        weight_decay: Weight decay (biases, norms and tokens get none: `medvit.optim.param_groups`).
        head_weight_decay: Weight decay of the head; None: `weight_decay`.
        sam: None, `sam` or `asam`.
        sam_rho: SAM's radius.
        epochs: Training epochs.
        warmup_epochs: Linear warmup epochs, then `schedule` to 0.
        schedule: `cosine` or `poly` (`medvit.optim.schedule`).
        grad_clip: Gradient-norm clip; None: off.
        ema: Keep an EMA of the weights (`medvit.optim.model_ema`).
        ema_decay: Its decay per step (DeiT's code: 0.99996).
    """

    name: str = "deit"
    randaug_ops: int = 2
    randaug_magnitude: int | None = 9
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    random_erasing: float = 0.25
    repeated_aug: int = 3
    drop_path_rate: float = 0.1
    dropout: float = 0.0
    hflip: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    eval_crop: float = 0.875
    volume_flip_axes: tuple[int, ...] = field(default=(0, 1, 2))
    optimizer: str = "adamw"
    lr: float = 5e-4
    lr_batch: int = 512
    weight_decay: float = 0.05
    head_weight_decay: float | None = None
    sam: str | None = None
    sam_rho: float = 0.05
    epochs: int = 300
    warmup_epochs: int = 5
    schedule: str = "cosine"
    grad_clip: float | None = None
    ema: bool = False
    ema_decay: float = 0.99996

    def __post_init__(self) -> None:
        choices = (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("schedule", self.schedule, SCHEDULES),
            ("sam", self.sam, (None, "sam", "asam")),
        )
        for what, value, allowed in choices:
            if value not in allowed:
                raise MedvitError(f"recipe {self.name}: {what} must be one of {allowed}, got {value!r}")
        for what in ("mix_prob", "switch_prob", "label_smoothing", "random_erasing", "hflip", "dropout"):
            if not 0.0 <= getattr(self, what) <= 1.0:
                raise MedvitError(f"recipe {self.name}: {what} must be in [0, 1], got {getattr(self, what)}")
        if self.repeated_aug < 1:
            raise MedvitError(f"recipe {self.name}: repeated_aug must be at least 1, got {self.repeated_aug}")

    def scaled_lr(self, batch_size: int) -> float:
        """`lr * batch_size / lr_batch` (DeiT's linear scaling; `batch_size` over all processes)."""
        return self.lr * batch_size / self.lr_batch

    def model_kwargs(self) -> dict[str, float]:
        """`create_model` arguments for the recipe's stochastic depth and dropout.

        Dropout goes after the position embedding and every attention / MLP projection, as
        ViT's and AugReg's `dropout_rate`; the keys are left out when it is 0, for models
        that do not take them.
        """
        kw = {"drop_path_rate": self.drop_path_rate}
        if self.dropout:
            kw.update(pos_drop_rate=self.dropout, proj_drop_rate=self.dropout)
        return kw

    def mixcut(self, num_classes: int) -> MixCut:
        """The recipe's batch mixing and label smoothing for `num_classes` classes."""
        return MixCut(
            num_classes,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.mix_prob,
            switch_prob=self.switch_prob,
            label_smoothing=self.label_smoothing,
        )


# -- the presets, as data ---------------------------------------------------------------
# Every augmentation and regulariser off; DeiT's optimiser and schedule.
BASELINE = dict(
    randaug_magnitude=None,
    mixup_alpha=0.0,
    cutmix_alpha=0.0,
    label_smoothing=0.0,
    random_erasing=0.0,
    repeated_aug=1,
    drop_path_rate=0.0,
    dropout=0.0,
)
# big_vision configs/vit_i1k.py RANDAUG_DEF / MIXUP_DEF (Steiner et al.); Mixup's `p` there
# is the Beta concentration, i.e. alpha.
AUGREG_AUG: dict[str, dict[str, Any]] = {
    "none": dict(randaug_magnitude=None, mixup_alpha=0.0),
    "light1": dict(randaug_ops=2, randaug_magnitude=0, mixup_alpha=0.0),
    "light2": dict(randaug_ops=2, randaug_magnitude=10, mixup_alpha=0.2),
    "medium1": dict(randaug_ops=2, randaug_magnitude=15, mixup_alpha=0.2),
    "medium2": dict(randaug_ops=2, randaug_magnitude=15, mixup_alpha=0.5),
    "strong1": dict(randaug_ops=2, randaug_magnitude=20, mixup_alpha=0.5),
    "strong2": dict(randaug_ops=2, randaug_magnitude=20, mixup_alpha=0.8),
}
AUGREG_REG: dict[str, dict[str, Any]] = {
    "none": dict(dropout=0.0, drop_path_rate=0.0),
    "reg": dict(dropout=0.1, drop_path_rate=0.1),
}


def _presets() -> dict[str, ClassifyRecipe]:
    out = {"baseline": ClassifyRecipe(name="baseline", **BASELINE), "deit": ClassifyRecipe(name="deit")}
    for aug, aug_kw in AUGREG_AUG.items():
        for reg, reg_kw in AUGREG_REG.items():
            name = f"augreg-{aug}-{reg}"
            out[name] = ClassifyRecipe(name=name, **{**BASELINE, **aug_kw, **reg_kw})
    return out


RECIPES: dict[str, ClassifyRecipe] = _presets()


def get_classify_recipe(name: str, **overrides: Any) -> ClassifyRecipe:
    """The preset `name`, with `overrides` of its fields.

    Raises:
        MedvitError: Unknown name or field.
    """
    if name not in RECIPES:
        raise MedvitError(f"unknown classification recipe {name!r}; choose one of {', '.join(RECIPES)}")
    try:
        return replace(RECIPES[name], **overrides)
    except TypeError as e:
        raise MedvitError(f"recipe {name}: {e}") from None


# -- per-sample transforms --------------------------------------------------------------
class LevelRandAugment(v2.RandAugment):
    """torchvision's RandAugment with the magnitude on the 0..10 level scale of TF and timm.

    Level 10 is torchvision's full range (rotate 30 deg, shear 0.3, translate 0.45 of the
    side, colour factors 1 +/- 0.9, posterize to 4 bits, solarize everything), level m is
    m / 10 of it. Levels above 10 (AugReg's 15 and 20) extend the geometric ops linearly,
    as TF's `level / 10 * max` does (level 20: rotate 60 deg); the photometric ops stay at
    their level-10 strength (a colour factor below 0 does not exist, posterize and solarize
    are already at their ends).

    Args:
        num_ops: Ops per sample.
        level: Magnitude, 0 or more.
        interpolation: Of the geometric ops.
        fill: Of the area outside a geometric op's image.
    """

    GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

    def __init__(
        self,
        num_ops: int = 2,
        level: int = 9,
        interpolation: v2.InterpolationMode = v2.InterpolationMode.NEAREST,
        fill: Any = None,
    ) -> None:
        if level < 0:
            raise ValueError(f"RandAugment level must be non-negative, got {level}")
        super().__init__(
            num_ops=num_ops,
            magnitude=level,
            num_magnitude_bins=max(11, level + 1),
            interpolation=interpolation,
            fill=fill,
        )
        self._AUGMENTATION_SPACE = {
            op: (self._on_levels(fn, op in self.GEOMETRIC), signed)
            for op, (fn, signed) in v2.RandAugment._AUGMENTATION_SPACE.items()
        }

    @staticmethod
    def _on_levels(fn: Callable[..., torch.Tensor | None], linear: bool) -> Callable[..., torch.Tensor | None]:
        def magnitudes(num_bins: int, height: int, width: int) -> torch.Tensor | None:
            ten = fn(11, height, width)  # levels 0..10
            if ten is None:
                return None
            if linear:
                return ten[1] * torch.arange(num_bins, dtype=ten.dtype)
            return torch.cat([ten, ten[-1:].expand(num_bins - 11)])

        return magnitudes


def _normalise(mean: Sequence[float] | None, std: Sequence[float] | None) -> list[Any]:
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    return [] if mean is None else [v2.Normalize(mean=list(mean), std=list(std))]


class _AsVideo:
    """(C, T, H, W) -> a `tv_tensors.Video` (T, C, H, W), so torchvision draws once per clip."""

    def __call__(self, clip: torch.Tensor) -> tv_tensors.Video:
        if clip.ndim != 4:
            raise ValueError(f"a clip must be (C, T, H, W), got shape {tuple(clip.shape)}")
        return tv_tensors.Video(clip.transpose(0, 1))


class _FromVideo:
    """A `tv_tensors.Video` (T, C, H, W) -> a plain (C, T, H, W) tensor."""

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        return video.as_subclass(torch.Tensor).transpose(0, 1).contiguous()


def _compose(ops: list[Any], kind: str) -> v2.Compose:
    """`ops` in order; a clip goes in as one `tv_tensors.Video` and comes out (C, T, H, W)."""
    return v2.Compose([_AsVideo(), *ops, _FromVideo()] if kind == "video" else ops)


def _check(kind: str, size: int | Sequence[int]) -> tuple[int, ...]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    dims = 3 if kind == "volume" else 2
    out = (int(size),) * dims if isinstance(size, int) else tuple(int(s) for s in size)
    if len(out) != dims:
        raise ValueError(f"a {kind} size has {dims} axes, got {size}")
    return out


def _volume_train(recipe: ClassifyRecipe, size: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    from monai.transforms import (  # MONAI loads only for volumes
        Compose,
        EnsureType,
        RandAffine,
        RandFlip,
        RandScaleIntensity,
        RandShiftIntensity,
        Resize,
    )

    return Compose(
        [
            Resize(size, mode="trilinear"),
            *[RandFlip(prob=0.5, spatial_axis=a) for a in recipe.volume_flip_axes],
            RandAffine(prob=0.2, rotate_range=(math.radians(15),) * 3, scale_range=(0.1,) * 3, padding_mode="zeros"),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.1, prob=0.5),
            EnsureType(data_type="tensor", track_meta=False),
        ]
    )


def train_transform(
    recipe: ClassifyRecipe,
    kind: str,
    size: int | Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-sample training transform of `recipe` (labels are not its business).

    `image` and `video`: random resized crop (bilinear, so values stay in [0, 1]), flip,
    RandAugment, normalisation (when `mean` and `std` are given), random erasing (with
    N(0, 1) noise, as DeiT after normalisation). `volume`: resize to `size`, flips, small
    rotation / scaling (p 0.2), intensity scale and shift (p 0.5 each); see the module notes.

    Args:
        recipe: The recipe.
        kind: `image` (C, H, W), `video` (C, T, H, W) or `volume` (C, D, H, W); float in [0, 1]
            for images and video.
        size: Output size (one int for every axis, or one per axis).
        mean: Per-channel mean to normalise with.
        std: Per-channel std.

    Raises:
        ValueError: Unknown kind, a size of the wrong length, or only one of mean / std.
    """
    size = _check(kind, size)
    if kind == "volume":
        return _volume_train(recipe, size)
    ops: list[Any] = [
        v2.RandomResizedCrop(size, scale=recipe.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(recipe.hflip),
    ]
    if recipe.randaug_magnitude is not None and recipe.randaug_ops > 0:
        ops.append(LevelRandAugment(recipe.randaug_ops, recipe.randaug_magnitude))
    ops += _normalise(mean, std)
    if recipe.random_erasing > 0:
        ops.append(v2.RandomErasing(p=recipe.random_erasing, value="random"))
    return _compose(ops, kind)


def eval_transform(
    recipe: ClassifyRecipe,
    kind: str,
    size: int | Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The evaluation transform: resize to `size / recipe.eval_crop` and centre-crop `size`
    (images, video; DeiT's 0.875), or resize to `size` (volumes); then normalise.

    Raises:
        ValueError: As `train_transform`.
    """
    size = _check(kind, size)
    if kind == "volume":
        from monai.transforms import Compose, EnsureType, Resize

        return Compose([Resize(size, mode="trilinear"), EnsureType(data_type="tensor", track_meta=False)])
    resize = [int(math.floor(s / recipe.eval_crop)) for s in size]
    ops: list[Any] = [v2.Resize(resize, antialias=True), v2.CenterCrop(size), *_normalise(mean, std)]
    return _compose(ops, kind)


# -- batch mixing -----------------------------------------------------------------------
def smooth_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """`(1 - smoothing) * targets + smoothing / K` for (B, K) class probabilities.

    On a Mixup / CutMix mixture this equals mixing the smoothed one-hots (timm's order).
    """
    return targets * (1.0 - smoothing) + smoothing / targets.shape[-1]


def cutmix_box(shape: Sequence[int], lam: float) -> tuple[tuple[slice, ...], float]:
    """A CutMix box over the spatial `shape` (any number of axes) and the `lam` it leaves.

    Each side is `(1 - lam)^(1/n)` of the axis, centred at a uniform random voxel and clipped
    to the array, as torchvision's 2D CutMix; the returned lam is `1 - box / whole`.
    """
    ratio = (1.0 - lam) ** (1.0 / len(shape))
    box = []
    for n in shape:
        centre = int(torch.randint(n, (1,)))
        half = int(0.5 * ratio * n)
        box.append(slice(max(centre - half, 0), min(centre + half, n)))
    inside = math.prod(s.stop - s.start for s in box)
    return tuple(box), 1.0 - inside / math.prod(shape)


def _lam_of(targets: torch.Tensor, y: torch.Tensor) -> float:
    """The own-sample weight of mixed targets: read off a row whose partner has another label."""
    rows = (y != y.roll(1)).nonzero()
    return float(targets[rows[0, 0], y[rows[0, 0]]]) if len(rows) else float("nan")


class MixCut:
    """Mixup or CutMix on a batch, then label smoothing: `(x, y) -> (mixed x, soft targets)`.

    Sample i is mixed with sample i - 1 (torchvision's pairing: the batch rolled by one), so
    the batch must be shuffled. With probability `prob` the batch is mixed; then CutMix with
    probability `switch_prob` when both are on, else the one that is on. The targets are
    `lam * onehot(y) + (1 - lam) * onehot(y.roll(1))`, smoothed by `smooth_targets`; an
    unmixed batch gets the smoothed one-hots. 4D batches (B, C, H, W) use torchvision's
    `MixUp` / `CutMix`; 5D batches (volumes (B, C, D, H, W), clips (B, C, T, H, W)) are mixed
    here, CutMix with a 3D box. Randomness comes from torch's global generator.

    Args:
        num_classes: K.
        mixup_alpha: Mixup's Beta(alpha, alpha); 0 = off.
        cutmix_alpha: CutMix's Beta(alpha, alpha); 0 = off.
        prob: Probability of mixing a batch.
        switch_prob: Probability of CutMix when both are on.
        label_smoothing: Smoothing of the targets.

    Attributes:
        last: `(mode, lam)` of the last call: `none`, `mixup` or `cutmix`, and the own sample's
            weight (nan for a 4D batch whose every label equals its partner's).
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.last: tuple[str, float] = ("none", 1.0)

    def _mode(self) -> str:
        if (self.mixup_alpha <= 0 and self.cutmix_alpha <= 0) or float(torch.rand(())) >= self.prob:
            return "none"
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            return "cutmix" if float(torch.rand(())) < self.switch_prob else "mixup"
        return "cutmix" if self.cutmix_alpha > 0 else "mixup"

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix `x` (B, C, *spatial) with labels `y` (B,) int; return `x` and (B, K) targets."""
        if x.ndim not in (4, 5) or y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"need x (B, C, *2 or 3 axes) and y (B,), got {tuple(x.shape)} and {tuple(y.shape)}")
        mode = self._mode()
        onehot = F.one_hot(y.long(), self.num_classes).float()
        if mode == "none":
            targets, lam = onehot, 1.0
        elif x.ndim == 4:
            cls = v2.CutMix if mode == "cutmix" else v2.MixUp
            alpha = self.cutmix_alpha if mode == "cutmix" else self.mixup_alpha
            x, targets = cls(alpha=alpha, num_classes=self.num_classes)(x, y.long())
            lam = _lam_of(targets, y)
        else:
            x, targets, lam = self._mix_nd(x, onehot, mode)
        self.last = (mode, lam)
        return x, smooth_targets(targets, self.label_smoothing)

    def _mix_nd(self, x: torch.Tensor, onehot: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        alpha = self.cutmix_alpha if mode == "cutmix" else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample(()))
        partner = x.roll(1, 0)
        if mode == "mixup":
            x = x * lam + partner * (1.0 - lam)
        else:
            box, lam = cutmix_box(x.shape[2:], lam)
            x = x.clone()
            x[(slice(None), slice(None), *box)] = partner[(slice(None), slice(None), *box)]
        return x, onehot * lam + onehot.roll(1, 0) * (1.0 - lam), lam


# -- sampling ---------------------------------------------------------------------------
class RepeatedAugmentationSampler(Sampler[int]):
    """Repeated augmentation (Hoffer et al. 2020; DeiT's `RASampler`), for one or many processes.

    An epoch's full list is a permutation of the dataset with every index written `repeats`
    times in a row, padded cyclically to a multiple of `num_replicas`; rank r takes every
    `num_replicas`-th entry from r, so the copies of a sample go to different processes (and
    get different augmentations), and keeps the first `ceil(dataset_len / num_replicas)`: an
    epoch stays as long as without repetition, and sees about 1 / repeats of the distinct
    samples. The permutation is drawn from `seed + epoch`: call `set_epoch` every epoch.

    Args:
        dataset_len: Number of samples.
        repeats: Copies of each sample.
        num_replicas: Number of processes.
        rank: This process.
        shuffle: Permute (else index order).
        seed: Base seed, the same on every process.

    Raises:
        ValueError: Empty dataset, repeats < 1, or rank outside [0, num_replicas).
    """

    def __init__(
        self,
        dataset_len: int,
        repeats: int = 3,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if dataset_len < 1 or repeats < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need dataset_len >= 1, repeats >= 1, 0 <= rank < num_replicas; got dataset_len={dataset_len},"
                f" repeats={repeats}, rank={rank}, num_replicas={num_replicas}"
            )
        self.dataset_len, self.repeats = dataset_len, repeats
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.total_size = math.ceil(dataset_len * repeats / num_replicas) * num_replicas
        self.num_selected = math.ceil(dataset_len / num_replicas)

    def full_indices(self) -> list[int]:
        """The epoch's list over all ranks, before each rank's stride and truncation."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=g).tolist()
        else:
            order = list(range(self.dataset_len))
        indices = [i for i in order for _ in range(self.repeats)]
        while len(indices) < self.total_size:
            indices += indices[: self.total_size - len(indices)]
        return indices

    def __iter__(self) -> Iterator[int]:
        mine = self.full_indices()[self.rank : self.total_size : self.num_replicas]
        return iter(mine[: self.num_selected])

    def __len__(self) -> int:
        return self.num_selected

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's permutation from `seed + epoch`."""
        self.epoch = epoch


# -- losses -----------------------------------------------------------------------------
def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`mean_b sum_k -targets[b, k] log softmax(logits)[b, k]`, for (B, K) class probabilities."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def hard_distillation_loss(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float = 0.5,
) -> torch.Tensor:
    """DeiT's hard distillation: `(1 - alpha) CE(cls, labels) + alpha CE(dist, argmax teacher)`.

    A distilled DeiT in distilled training (`model.set_distilled_training()`, train mode)
    returns `(cls_logits, dist_logits)`; a model without a distillation token returns one
    tensor, and both terms then train its one head. `labels` are class indices (B,) or
    probabilities (B, K) (from `MixCut`); the teacher's arg-max is taken on the batch the
    student saw (mixed too). `medvit.losses.HardDistillationLoss` computes it.

    Args:
        outputs: The student's logits, or its pair.
        labels: Targets of the class head.
        teacher_logits: The teacher's logits (B, K) on the same batch.
        alpha: Weight of the distillation term (DeiT: 0.5).
    """
    pair = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs, outputs)
    return HardDistillationLoss(alpha=alpha)(pair, labels, teacher_logits=teacher_logits)
