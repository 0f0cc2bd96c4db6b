"""Train a segmentation model: DiceCE, AdamW with the recipe's schedule, sliding-window Dice.

The training recipe (`medvit.pipelines.recipes`) sets augmentation, crop sampling and LR
schedule; connected-component post-processing is chosen on every validation's predictions
(`medvit.pipelines.postprocess`) and stored in the checkpoints' cards. With a teacher
checkpoint the loss adds DeiT's hard-label distillation term (`medvit.pipelines.distill`).

One process per device; under `torchrun` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (NCCL on GPUs, gloo on CPUs). Only rank 0 validates, logs to
TensorBoard and writes checkpoints.

The dataset is verified (`medvit.pipelines.verify`) before anything else, and refused
with every problem listed. A run can be killed at any moment and resumed: everything a
resume needs (weights, optimiser, schedule, step, best Dice, model card) is one file,
`last_state.pt`, written under a temporary name and renamed, so it always describes one
and the same step; each epoch's randomness (shuffling, crops, augmentation) is seeded
from the run seed and the epoch number, so a resumed run repeats the epochs it lost
exactly as they were first drawn.

The validation cases are a held-out fraction, or one fold of nnU-Net's cross-validation
(`medvit.pipelines.splits`); every run writes its split as `splits.json` (nnU-Net's
`splits_final.json` format), the cards record the fold and the validation cases, and a
resumed run must split as the run it continues did.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import compute_dice
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

import medvit
from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.augment import train_transforms
from medvit.pipelines.case_cache import CaseCache, default_cache_dir
from medvit.pipelines.checkpoint import ModelCard, save_checkpoint
from medvit.pipelines.distill import DEFAULT_DISTILL_WEIGHT, HardDistillationLoss, check_weight, load_teacher
from medvit.pipelines.encoder_init import load_encoder
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.fingerprint import compute_fingerprint
from medvit.pipelines.loop import (
    STATE_FILE, EpochLoop, check_steps, epoch_seed, read_state, run_to_end, seed_all, start_process,
)  # fmt: skip
from medvit.pipelines.postprocess import ValidationCase, determine_postprocessing
from medvit.pipelines.preprocessing import DEFAULT_SPACING, Preprocessing, default_intensity
from medvit.pipelines.recipes import get_recipe, lr_lambda
from medvit.pipelines.runtime import autocast, training_dtype
from medvit.pipelines.slicing import SliceSpec, in_plane
from medvit.pipelines.splits import SPLITS_FILE, check_split_options, read_splits, run_split
from medvit.pipelines.stitch import stream_probabilities, stream_slice_probabilities
from medvit.pipelines.train_data import CropDataset, EpochLoader, default_workers
from medvit.pipelines.train_images import overlay_slice
from medvit.pipelines.transforms import preprocess_transforms
from medvit.pipelines.verify import format_problems, verified_dataset
from medvit.registry import variant_accepts


DEFAULT_EPOCHS = 100
# Validation (a sliding window over every validation case, then two checkpoints) at most about
# this often by default: nnU-Net's epoch is 250 steps; an epoch of a few cases is one or two.
VAL_STEPS = 250


@dataclass
class TrainConfig:
    """Options of `medvit train` (see the CLI for their meaning)."""

    data: str | Path
    out_dir: str | Path
    model: str = "unetr_base"
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    max_steps: int | None = None
    patch_size: tuple[int, int, int] = (96, 96, 96)
    slice_axis: int = 2
    slab: int = 1
    spacing: tuple[float, float, float] | None = DEFAULT_SPACING
    intensity: str | None = None
    batch_size: int = 2
    samples_per_volume: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_fraction: float = 0.05
    val_fraction: float | None = None  # None: 0.2, unless a fold is given
    folds: int | None = None
    fold: int | str | None = None
    split_file: str | Path | None = None
    val_every: int | None = None  # None: every epoch, or every VAL_STEPS steps' worth of short epochs
    overlap: float = 0.25
    device: str = "auto"
    amp: bool | None = None  # None: where the device has it (`training_dtype`)
    resume: bool = False
    seed: int = 0
    progress: bool = True
    recipe: str = "default"
    deep_supervision: bool = False
    teacher: str | Path | None = None
    distill_weight: float = DEFAULT_DISTILL_WEIGHT
    init_encoder: str | Path | None = None
    workers: int | None = None  # None: `train_data.default_workers`
    cache_dir: str | Path | None = None  # None: `case_cache.default_cache_dir()`


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epochs: int
    best_dice: float
    last_dice: dict[str, float]


def deep_supervision_loss(levels: int) -> DeepSupervisionLoss:
    """DiceCE summed over a deeply supervised model's outputs (full resolution first), as nnU-Net.

    Output `i` weighs `2**-i`, the weights normalised to sum 1 (Isensee et al. 2021; the
    model has no head on the coarsest decoder level, which nnU-Net weighs 0). MONAI resizes
    the label map to each output's size by nearest-neighbour interpolation (`nearest-exact`).
    """
    weights = [0.5**i for i in range(levels)]
    total = sum(weights)
    return DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weights=[w / total for w in weights])




class Trainer(EpochLoop):
    """Holds the model, data and optimiser of one run; `run()` trains to the end."""

    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.world, self.rank, self.device = start_process(config.device)
        self.is_main = self.rank == 0
        self.out = Path(config.out_dir)
        check_steps(config.epochs, config.max_steps, config.batch_size)
        check_split_options(config.folds, config.fold, config.split_file, config.val_fraction)  # before the data
        seed_all(config.seed + self.rank)

        self.recipe = get_recipe(config.recipe)
        self.spec, warnings = verified_dataset(config.data, "nothing was trained")
        if self.is_main:
            for line in format_problems(warnings):
                tqdm.write(line, file=sys.stderr)
        self.split = run_split(
            [c.name for c in self.spec.cases], folds=config.folds, fold=config.fold, split_file=config.split_file,
            val_fraction=config.val_fraction, seed=config.seed,
        )
        self.class_ids = sorted(self.spec.labels)
        self.num_classes = len(self.class_ids) + 1
        self.prep, self.card_prep = self._preprocessing()
        self.slices: SliceSpec | None = None
        self.model = self._build_model().to(self.device)
        # a pretrained encoder (`medvit pretrain`); a resumed run's state overwrites it
        self.init_encoder = load_encoder(self.model, config.init_encoder) if config.init_encoder else None
        self.card = ModelCard(
            model_name=config.model,
            model_args=self.model_args,
            labels={i + 1: {"id": lid, "name": self.spec.labels[lid]} for i, lid in enumerate(self.class_ids)},
            preprocessing=self.card_prep.to_dict(),
            patch_size=self.window,
            slicing=None if self.slices is None else {"axis": self.slices.axis, "slab": self.slices.slab},
        )
        self.teacher: nn.Module | None = None
        self.distillation: dict[str, Any] = {}
        if config.teacher is not None:
            check_weight(config.distill_weight)  # before the (long) caching of the data
            self.teacher = load_teacher(config.teacher, self.card, self.device)
            self.distillation = {"teacher": Path(config.teacher).name, "weight": config.distill_weight}
        by_name = {c.name: c for c in self.spec.cases}
        self.cache = self._cache()
        self.train_loader = self._loader([by_name[n] for n in self.split.train])
        self.val_cases = [by_name[n] for n in self.split.val] if self.is_main else []
        steps_per_epoch = len(self.train_loader)
        # --max-steps alone sets the length (an epoch of a one-case dataset is one step);
        # --epochs alone, or both (whichever ends first); neither: DEFAULT_EPOCHS
        epochs = config.epochs if config.epochs is not None or config.max_steps else DEFAULT_EPOCHS
        total = epochs * steps_per_epoch if epochs is not None else config.max_steps
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.warmup = max(1, int(config.warmup_fraction * self.total_steps))
        self.val_every = config.val_every if config.val_every is not None else max(1, -(-VAL_STEPS // steps_per_epoch))
        if self.val_every < 1:
            raise MedvitError(f"--val-every must be >= 1, got {self.val_every}")
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.recipe.schedule, self.total_steps, self.warmup)
        )
        self.amp_dtype = training_dtype(self.device, config.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn: nn.Module = DiceCELoss(to_onehot_y=True, softmax=True)
        if self.model_args.get("deep_supervision"):
            self.loss_fn = deep_supervision_loss(1 + len(self.model.aux_heads))
        if self.teacher is not None:
            self.loss_fn = HardDistillationLoss(self.loss_fn, config.distill_weight)
        self.step, self.epoch, self.best = 0, 0, -1.0
        self.last_dice: dict[str, float] = {}
        if config.resume:
            self._resume()
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    # -- set-up -------------------------------------------------------------------------
    def _preprocessing(self) -> tuple[Preprocessing, Preprocessing]:
        """(what to apply here, what the checkpoint records for inference)."""
        if self.spec.layout == "preprocessed":
            recorded = Preprocessing.from_dict(self.spec.preprocessing or {})
            return Preprocessing(spacing=None, intensity="none"), recorded
        intensity = self.cfg.intensity or default_intensity(self.spec.modality)
        prep = Preprocessing(spacing=self.cfg.spacing, intensity=intensity)
        if intensity == "ct-fingerprint":
            prep = prep.with_fingerprint(compute_fingerprint(self.spec))
        return prep, prep

    def _build_model(self) -> nn.Module:
        """The model at the run's patch size; a 2D model gets in-plane windows and slab channels."""
        args = dict(self.cfg.model_args)
        try:
            if self.cfg.deep_supervision:
                if not variant_accepts(self.cfg.model, "deep_supervision"):
                    raise MedvitError(
                        f"--deep-supervision needs a decoder with several scales; {self.cfg.model} has one"
                    )
                args["deep_supervision"] = True
            with torch.device("meta"):  # only to learn whether the model is 2D or 3D
                dims = getattr(medvit.create_model(self.cfg.model, **args), "spatial_dims", 3)
            self.window = tuple(int(p) for p in self.cfg.patch_size)
            in_chans = 1
            if dims == 2:
                self.slices = SliceSpec(self.cfg.slice_axis, self.cfg.slab)
                self.window = in_plane(self.cfg.patch_size, self.slices.axis)
                in_chans = self.slices.slab
            elif dims != 3:
                raise ValueError(f"it is a {dims}D model; segmentation needs a 2D or 3D one")
            args.update(img_size=self.window, num_classes=self.num_classes, in_chans=in_chans)
            self.model_args = args
            return medvit.create_model(self.cfg.model, **args)
        except MedvitError:
            raise
        except (ValueError, TypeError) as e:
            raise MedvitError(f"cannot build model {self.cfg.model!r} for this run: {e}") from None

    def _cache(self) -> CaseCache:
        """The preprocessed cases of this preprocessing, on disk (filled as cases are first used)."""
        remap = None if getattr(self.spec, "remapped", False) else self.class_ids
        load = preprocess_transforms(
            self.prep, ("image", "label"), label_ids=remap, crop_foreground=self.recipe.crop_to_body
        )
        settings = {"preprocessing": self.prep.to_dict(), "remap": remap, "crop_to_body": self.recipe.crop_to_body}
        root = self.cfg.cache_dir if self.cfg.cache_dir is not None else default_cache_dir()
        return CaseCache(root, load, settings, self.num_classes)

    def _loader(self, cases: list) -> EpochLoader:
        crop = list(self.cfg.patch_size)
        axis = None
        if self.slices is not None:
            axis = self.slices.axis
            crop[axis] = self.slices.slab
        aug = train_transforms(
            self.recipe, crop, self.num_classes, self.cfg.samples_per_volume, slice_axis=axis,
            label_names=self.spec.class_names, orientation=self.prep.orientation,
        )
        workers = self.cfg.workers if self.cfg.workers is not None else default_workers(self.device)
        if workers < 0:
            raise MedvitError(f"--workers must be >= 0, got {workers}")
        ds = CropDataset(cases, self.cache, aug, self.cfg.seed, self.rank)
        return EpochLoader(ds, self.cfg.batch_size, workers, pin_memory=self.device.type == "cuda")

    # -- checkpoints ----------------------------------------------------------------------
    def _save(self, name: str) -> None:
        self.card.extra = {
            "step": self.step, "epoch": self.epoch, "best_dice": self.best, "last_dice": self.last_dice,
            "split": self.split.record(),
        }
        if self.distillation:
            self.card.extra["distillation"] = dict(self.distillation)
        if self.init_encoder:
            self.card.extra["init_encoder"] = dict(self.init_encoder)
        save_checkpoint(self.model, self.card, self.out / f"{name}.safetensors")
        if name == "last":
            # The weights travel with the optimiser: a kill between writing two files
            # could otherwise pair one step's weights with another step's optimiser.
            state = {
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "card": self.card.to_json(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "epoch": self.epoch,
                "best": self.best,
                "last_dice": dict(self.last_dice),
            }
            write_atomic(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))

    def _resume(self) -> None:
        state, card, state_path = read_state(self.out, self.device)
        if card.model_name != self.cfg.model or card.model_args != json.loads(json.dumps(self.model_args)):
            raise MedvitError(
                f"{state_path}: was trained as {card.model_name} {card.model_args}; resume with the same settings"
            )
        self._check_split(card, state_path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.best = int(state["step"]), int(state["epoch"]), float(state["best"])
        self.last_dice = dict(state["last_dice"])

    def _check_split(self, card: ModelCard, state_path: Path) -> None:
        """A resumed run validates on the cases the run it continues validated on."""
        advice = "resume with the same --fold, --folds, --split-file, --val-fraction and --seed"
        recorded = card.extra.get("split")  # absent in states from before splits were recorded
        if recorded is not None and recorded != self.split.record():
            fold = recorded.get("fold")
            was = "a held-out fraction of the cases" if fold is None else f"fold {fold} of {recorded.get('folds')}"
            raise MedvitError(f"{state_path}: was trained with other validation cases ({was}); {advice}")
        stored = self.out / SPLITS_FILE
        if stored.exists() and read_splits(stored, [c.name for c in self.spec.cases]) != self.split.splits:
            raise MedvitError(f"{stored}: this run's split differs from the one stored; {advice}")

    def _seed_epoch(self) -> None:
        """Draw this epoch's randomness from (seed, rank, epoch) alone, so a resumed run
        repeats a lost epoch exactly: shuffling, crops, augmentations, dropout."""
        seed = epoch_seed(self.cfg.seed, self.rank, self.epoch)
        seed_all(seed)
        self.train_loader.set_epoch(self.epoch)  # crops and augmentation: seeded per item

    # -- loop -----------------------------------------------------------------------------
    def _train_step(self, batch: dict) -> float:
        x = batch["image"].to(self.device, non_blocking=True)  # pinned by the loader on CUDA
        y = batch["label"].to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp_dtype is not None, self.amp_dtype):
            if self.teacher is None:
                loss = self.loss_fn(self.ddp_model(x), y)
            else:
                with torch.no_grad():
                    target = self.teacher(x)
                loss = self.loss_fn(self.ddp_model(x), y, target)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp_dtype is not None, self.amp_dtype):
            return self.model(x)

    def _probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Model-space probabilities of a validation volume, inferred as `medvit segment` does."""
        k = self.num_classes
        if self.slices is not None:
            return stream_slice_probabilities(
                self._predict, image, self.window, k, self.slices, 4, self.cfg.overlap, torch.float32
            )
        return stream_probabilities(self._predict, image, self.window, k, 4, self.cfg.overlap, torch.float32)

    @torch.no_grad()
    def validate(self, writer: SummaryWriter | None) -> dict[str, float]:
        self.model.eval()
        dices, shown, cases = [], False, []
        for case in self.val_cases:  # one case in memory at a time
            cached = self.cache.get(case)
            image, label = cached.arrays(mmap=False)
            img = torch.from_numpy(image).to(self.device)
            pred = self._probabilities(img).argmax(0)[None, None]
            lab = torch.from_numpy(label.astype(np.int64))[None, None]
            onehot = lambda t: torch.nn.functional.one_hot(t[:, 0], self.num_classes).movedim(-1, 1)  # noqa: E731
            dices.append(compute_dice(onehot(pred), onehot(lab), include_background=False, ignore_empty=False)[0])
            cases.append(ValidationCase(pred[0, 0].cpu().numpy(), label, cached.voxel_ml))
            if writer is not None and not shown:
                writer.add_image("val/prediction", overlay_slice(img[0].cpu(), pred[0, 0], lab[0, 0]), self.step)
                shown = True
        self.model.train()
        self.card.postprocessing = determine_postprocessing(cases, self.card.labels)
        mean = torch.stack(dices).nanmean(0) if dices else torch.zeros(self.num_classes - 1)
        names = [self.spec.labels[i] for i in self.class_ids]
        return {n: float(d) for n, d in zip(names, mean)}

    def _run_info(self) -> dict[str, Any]:
        precision = str(self.amp_dtype or torch.float32).removeprefix("torch.")
        return {**asdict(self.cfg), "world_size": self.world, "total_steps": self.total_steps, "precision": precision}

    def run(self) -> TrainResult:
        self.model.train()
        try:
            self.run_loop()
        finally:
            self.train_loader.close()
        return TrainResult(self.out, self.step, self.epoch, self.best, self.last_dice)

    def _end_of_epoch(self, writer: SummaryWriter | None) -> None:
        self.last_dice = self.validate(writer)
        mean = float(np.nanmean(list(self.last_dice.values()))) if self.last_dice else 0.0
        if writer is not None:
            for name, d in self.last_dice.items():
                writer.add_scalar(f"val/dice_{name}", d, self.step)
            writer.add_scalar("val/mean_dice", mean, self.step)
        if mean > self.best:
            self.best = mean
            self._save("best")
        self._save("last")


def train(config: TrainConfig) -> TrainResult:
    """Train as configured; under torchrun every process calls this."""
    return run_to_end(Trainer(config))
