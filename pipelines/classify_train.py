"""Train a classifier of images, volumes or video clips with the ViT papers' recipes.

Any registered image backbone classifies 2D images (and, with `spatial_dims=3`, volumes);
any video backbone classifies clips. The recipe (`pipelines.classify_recipe`: `deit`,
`baseline`, the AugReg grid) gives the augmentation, batch mixing, label smoothing, the
optimiser (AdamW, SGD, Adafactor, with SAM/ASAM), the schedule and the weight EMA; a
teacher checkpoint adds DeiT's hard distillation (through the distillation token of the
distilled DeiTs). The run's layout is that of segmentation training: `last.safetensors`,
`best.safetensors` (best validation balanced accuracy), one atomic resume state,
`splits.json`, `config.json` and TensorBoard logs in `tb/`; DDP under torchrun.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from medvit.optim.ema import model_ema
from medvit.optim.factory import make_optimizer
from medvit.optim.param_groups import param_groups
from medvit.optim.schedule import schedule_factor
from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.checkpoint import ModelCard, load_checkpoint, require_task, save_checkpoint
from medvit.pipelines.classify_data import ClassificationDataset, check_trainable, read_classification_data
from medvit.pipelines.classify_metrics import classification_metrics
from medvit.pipelines.classify_recipe import (
    get_classify_recipe,
    hard_distillation_loss,
    soft_target_cross_entropy,
    train_transform,
    RepeatedAugmentationSampler,
)
from medvit.pipelines.encoder_init import load_encoder
from medvit.pipelines.errors import MedvitError, one_line
from medvit.pipelines.loop import (
    STATE_FILE, EpochLoop, check_steps, epoch_seed, read_state, run_to_end, seed_all, start_process,
)  # fmt: skip
from medvit.pipelines.runtime import autocast
from medvit.pipelines.splits import run_split
from medvit.registry import create_model, model_kind, variant_accepts

DEFAULT_SIZE = {"image": (224, 224), "volume": (64, 64, 64), "video": (224, 224)}


@dataclass
class ClassifyConfig:
    """Options of `medvit train` on classification data (see the CLI for their meaning)."""

    data: str | Path
    out_dir: str | Path
    model: str = "deit_tiny_patch16_224"
    model_args: dict[str, Any] = field(default_factory=dict)
    recipe: str = "deit"
    kind: str | None = None
    size: tuple[int, ...] | None = None
    frames: int = 8
    in_chans: int | None = None
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 32
    lr: float | None = None  # None: the recipe's, scaled by the global batch
    weight_decay: float | None = None
    optimizer: str | None = None
    sam: str | None = None
    sam_rho: float | None = None
    ema: bool | None = None
    teacher: str | Path | None = None
    distill_weight: float = 0.5
    init_encoder: str | Path | None = None
    val_fraction: float | None = None
    folds: int | None = None
    fold: int | str | None = None
    split_file: str | Path | None = None
    val_every: int = 1
    cache: bool = True
    workers: int = 0
    device: str = "auto"
    amp: bool = False
    resume: bool = False
    seed: int = 0
    progress: bool = True


@dataclass
class ClassifyResult:
    out_dir: Path
    steps: int
    epochs: int
    best: float
    last_metrics: dict[str, Any]


class ClassifyTrainer(EpochLoop):
    """Holds the model, data and optimiser of one classification run; `run()` trains to the end."""

    def __init__(self, config: ClassifyConfig) -> None:
        self.cfg = config
        self.world, self.rank, self.device = start_process(config.device)
        self.is_main = self.rank == 0
        self.out = Path(config.out_dir)
        check_steps(config.epochs, config.max_steps, config.batch_size)
        seed_all(config.seed + self.rank)

        overrides = {k: v for k, v in dict(optimizer=config.optimizer, sam=config.sam, sam_rho=config.sam_rho,
                                          ema=config.ema).items() if v is not None}  # fmt: skip
        self.recipe = get_classify_recipe(config.recipe, **overrides)
        self.data = read_classification_data(Path(config.data), config.kind)
        check_trainable(self.data)
        self.kind = self.data.kind
        self.size = tuple(config.size) if config.size else DEFAULT_SIZE[self.kind]
        self.in_chans = config.in_chans or (1 if self.kind == "volume" else 3)
        self.classes = list(self.data.classes)
        ids = [item.id for item in self.data.items]
        self.split = run_split(ids, folds=config.folds, fold=config.fold, split_file=config.split_file,
                               val_fraction=config.val_fraction, seed=config.seed)  # fmt: skip
        index = {i: n for n, i in enumerate(ids)}
        self.train_idx = [index[i] for i in self.split.train]
        self.val_idx = [index[i] for i in self.split.val]

        self.model_args = self._model_args()
        self.model = self._build_model().to(self.device)
        # a pretrained backbone (`medvit pretrain`), the head left random; before the EMA copy
        self.init_encoder = (load_encoder(self.model, config.init_encoder, keep_head=True)
                             if config.init_encoder else None)  # fmt: skip
        self.distilled = hasattr(self.model, "set_distilled_training") and config.teacher is not None
        if self.distilled:
            self.model.set_distilled_training(True)
        self.teacher = self._load_teacher() if config.teacher is not None else None

        self.train_loader = self._train_loader()
        self.val_loader = self._val_loader()
        self.steps_per_epoch = max(1, len(self.train_loader))
        if config.epochs is None and config.max_steps is None:
            epochs = self.recipe.epochs
        else:
            epochs = config.epochs if config.epochs is not None else -(-config.max_steps // self.steps_per_epoch)
        self.total_steps = epochs * self.steps_per_epoch
        self.val_every = config.val_every
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.warmup = min(self.recipe.warmup_epochs * self.steps_per_epoch, self.total_steps // 4)

        wd = self.recipe.weight_decay if config.weight_decay is None else config.weight_decay
        self.lr = config.lr if config.lr is not None else self.recipe.scaled_lr(config.batch_size * self.world)
        groups = param_groups(self.model, wd, head_weight_decay=self.recipe.head_weight_decay)
        self.optimizer = make_optimizer(self.recipe.optimizer, groups, self.lr, wd, sam=self.recipe.sam,
                                        rho=self.recipe.sam_rho)  # fmt: skip
        schedule = self.recipe.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: schedule_factor(schedule, s, self.total_steps, self.warmup)
        )
        self.use_sam = self.recipe.sam is not None
        # SAM's two passes do not go through a GradScaler: with AMP on CUDA it runs in bf16
        self.amp_dtype = torch.bfloat16 if self.use_sam else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and self.device.type == "cuda" and not self.use_sam)
        self.ema = model_ema(self.model, self.recipe.ema_decay) if self.recipe.ema else None
        self.mixcut = self.recipe.mixcut(len(self.classes))
        self.ddp_model = self.model
        if self.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.card = ModelCard(
            model_name=config.model, model_args=self.model_args,
            labels={i: {"id": i, "name": name} for i, name in enumerate(self.classes)},
            preprocessing={"kind": self.kind, "in_chans": self.in_chans, "intensity": "auto",
                           "frames": config.frames if self.kind == "video" else None},
            patch_size=(config.frames, *self.size) if self.kind == "video" else self.size,
            task="classification",
        )  # fmt: skip
        self.step = self.epoch = 0
        self.best = -1.0
        self.last_metrics: dict[str, Any] = {}
        if config.resume:
            self._resume()

    # -- setup ----------------------------------------------------------------------------
    def _model_args(self) -> dict[str, Any]:
        name, kind = self.cfg.model, model_kind(self.cfg.model)
        if kind == "volume":
            raise MedvitError(f"{name} is a segmentation model; classify with an image or video backbone "
                              "(medvit models image / video)")  # fmt: skip
        if (kind == "video") != (self.kind == "video"):
            raise MedvitError(f"{self.cfg.data}: {self.kind} data needs an {'video' if self.kind == 'video' else 'image'} "
                              f"backbone; {name} is a {kind} model")  # fmt: skip
        args = {**self.recipe.model_kwargs(), "num_classes": len(self.classes), "in_chans": self.in_chans,
                "img_size": self.size}  # fmt: skip
        if self.kind == "volume":
            if not variant_accepts(name, "spatial_dims"):
                raise MedvitError(f"{name} has no 3D form (no spatial_dims); classify volumes with a ViT-style backbone")
            args["spatial_dims"] = 3
        if self.kind == "video":
            args["num_frames"] = self.cfg.frames
        args = {k: v for k, v in args.items() if k in ("num_classes", "in_chans", "img_size") or variant_accepts(name, k)}
        args.update(self.cfg.model_args)
        return json.loads(json.dumps(args))

    def _build_model(self) -> nn.Module:
        try:
            return create_model(self.cfg.model, **self.model_args)
        except ValueError as e:
            raise MedvitError(f"{self.cfg.model}: cannot be built for {self.kind} inputs of size {self.size} "
                              f"({one_line(str(e))})") from None  # fmt: skip

    def _load_teacher(self) -> nn.Module:
        teacher, card = load_checkpoint(self.cfg.teacher, self.device)
        require_task(card, self.cfg.teacher, "classification")
        if card.class_names() != self.classes:
            raise MedvitError(f"{self.cfg.teacher}: the teacher must classify this run's classes ({', '.join(self.classes)})")
        if card.preprocessing.get("kind") != self.kind or card.preprocessing.get("in_chans") != self.in_chans:
            raise MedvitError(f"{self.cfg.teacher}: the teacher takes {card.preprocessing.get('kind')} inputs with "
                              f"{card.preprocessing.get('in_chans')} channels; this run {self.kind} with {self.in_chans}")
        self.teacher_size = tuple(card.patch_size)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    def _dataset(self, transform, normalise: bool) -> ClassificationDataset:
        frames = self.cfg.frames if self.kind == "video" else None
        return ClassificationDataset(self.data, self.size, self.in_chans, frames, transform=transform,
                                     cache=self.cfg.cache, normalise=normalise)  # fmt: skip

    def _train_loader(self) -> DataLoader:
        own = self.kind != "volume"  # image and video transforms normalise themselves (erasing noise)
        c = self.in_chans
        tf = train_transform(self.recipe, self.kind, self.size, *(((0.5,) * c, (0.5,) * c) if own else ()))
        ds = Subset(self._dataset(tf, normalise=not own), self.train_idx)
        batch = min(self.cfg.batch_size, len(ds))
        if self.recipe.repeated_aug > 1:
            sampler = RepeatedAugmentationSampler(len(ds), self.recipe.repeated_aug, self.world, self.rank,
                                                  seed=self.cfg.seed)  # fmt: skip
        elif self.world > 1:
            sampler = DistributedSampler(ds, self.world, self.rank, seed=self.cfg.seed)
        else:
            sampler = None
        gen = torch.Generator().manual_seed(self.cfg.seed + self.rank)
        return DataLoader(ds, batch_size=batch, sampler=sampler, shuffle=sampler is None, generator=gen,
                          num_workers=self.cfg.workers, drop_last=len(ds) >= 2 * batch)  # fmt: skip

    def _val_loader(self) -> DataLoader:
        ds = Subset(self._dataset(None, normalise=True), self.val_idx)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=False, num_workers=self.cfg.workers)

    # -- checkpoints ----------------------------------------------------------------------
    def _weights(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _save(self, name: str) -> None:
        self.card.extra = {"step": self.step, "epoch": self.epoch, "best_balanced_accuracy": self.best,
                           "metrics": self.last_metrics, "split": self.split.record(), "recipe": asdict(self.recipe)}  # fmt: skip
        if self.teacher is not None:
            self.card.extra["distillation"] = {"teacher": str(self.cfg.teacher), "weight": self.cfg.distill_weight}
        if self.init_encoder:
            self.card.extra["init_encoder"] = dict(self.init_encoder)
        save_checkpoint(self._weights(), self.card, self.out / f"{name}.safetensors")
        if name == "last":
            state = {
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "card": self.card.to_json(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "best": self.best,
            }  # fmt: skip
            write_atomic(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))

    def _resume(self) -> None:
        state, card, path = read_state(self.out, self.device)
        if card.model_name != self.cfg.model or card.model_args != self.model_args or card.labels != self.card.labels:
            raise MedvitError(f"{path}: was trained as {card.model_name} {card.model_args} on classes "
                              f"{card.label_names()}; resume with the same settings and data")  # fmt: skip
        if card.extra.get("split") not in (None, self.split.record()):
            raise MedvitError(f"{path}: was trained with other validation cases; resume with the same split options")
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.best = int(state["step"]), int(state["epoch"]), float(state["best"])

    # -- loop -----------------------------------------------------------------------------
    def _seed_epoch(self) -> None:
        seed = epoch_seed(self.cfg.seed, self.rank, self.epoch)
        seed_all(seed)
        self.train_loader.generator.manual_seed(seed)
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)

    def _loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.cfg.amp, self.amp_dtype):
            out = self.ddp_model(x)
            if self.teacher is None:
                logits = out[0] if isinstance(out, (tuple, list)) else out
                return soft_target_cross_entropy(logits, targets)
            with torch.no_grad():
                xt = x if tuple(x.shape[2:]) == self.teacher_size[-(x.dim() - 2):] else F.interpolate(
                    x, size=self.teacher_size[-(x.dim() - 2):], mode="bilinear" if x.dim() == 4 else "trilinear")
                teacher_logits = self.teacher(xt)
            return hard_distillation_loss(out, targets, teacher_logits, alpha=self.cfg.distill_weight)

    def _train_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        x, y = (t.to(self.device) for t in batch)
        x, targets = self.mixcut(x, y)  # soft targets: mixing and label smoothing
        self.optimizer.zero_grad(set_to_none=True)
        if self.use_sam:
            def closure() -> torch.Tensor:
                loss = self._loss(x, targets)
                loss.backward()
                return loss

            loss = self.optimizer.step(closure)  # forward-backward at w, then at w + e(w)
        else:
            loss = self._loss(x, targets)
            self.scaler.scale(loss).backward()
            if self.recipe.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return float(loss.detach())

    @torch.no_grad()
    def predict_probabilities(self, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
        model = self._weights()
        model.eval()
        probs, labels = [], []
        for x, y in loader:
            with autocast(self.device, self.cfg.amp):
                logits = model(x.to(self.device))
            probs.append(torch.softmax(logits.float(), -1).cpu())
            labels.append(y)
        model.train()
        if self.distilled:
            self.model.set_distilled_training(True)
        return torch.cat(probs).numpy(), torch.cat(labels).numpy()

    def validate(self) -> dict[str, Any]:
        probs, labels = self.predict_probabilities(self.val_loader)
        return classification_metrics(probs, labels, self.classes)

    def _run_info(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "world_size": self.world, "total_steps": self.total_steps, "lr": self.lr,
                "kind": self.kind, "classes": self.classes}  # fmt: skip

    def run(self) -> ClassifyResult:
        self.model.train()
        self.run_loop()
        return ClassifyResult(self.out, self.step, self.epoch, self.best, self.last_metrics)

    def _end_of_epoch(self, writer: SummaryWriter | None) -> None:
        self.last_metrics = self.validate()
        score = self.last_metrics["balanced_accuracy"]
        if writer is not None:
            for key in ("accuracy", "balanced_accuracy", "auroc_macro"):
                if self.last_metrics.get(key) is not None:
                    writer.add_scalar(f"val/{key}", self.last_metrics[key], self.step)
        if score > self.best:
            self.best = score
            self._save("best")
        self._save("last")


def train_classifier(config: ClassifyConfig) -> ClassifyResult:
    """Train as configured; under torchrun every process calls this."""
    return run_to_end(ClassifyTrainer(config))
