"""Self-supervised pretraining of an encoder on unlabelled scans (`medvit pretrain`).

The methods (`medvit.ssl`): MoCo v3, DINO (multi-crop, 2D or 3D), SiT-style multi-task.
The data: scans resampled to a spacing and CT-windowed in memory, random views of random
regions (`pipelines.pretrain_data`); 3D views for volume encoders, views of axial slices
(or of 2D images, when DATA holds PNG / JPEG / BMP / TIFF files) for 2D ones. The run shares the trainers' loop (`pipelines.loop`): DDP under torchrun,
per-epoch seeding from (seed, rank, epoch), TensorBoard (`train/loss`, `train/lr`, and for
DINO `dino/teacher_entropy` and `dino/center_norm`, for SiT the three losses), one atomic
resume state, `config.json`. `last.safetensors` and `best.safetensors` (the lowest mean
epoch loss) hold the encoder (DINO's teacher, MoCo v3's base encoder) with a card of task
`pretraining` naming the encoder (a backbone, or the segmenter whose encoder it is), the
method and its hyper-parameters: `medvit train --init-encoder` loads it.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from torch.utils.tensorboard import SummaryWriter

from medvit.optim.factory import make_optimizer
from medvit.optim.param_groups import param_groups
from medvit.optim.schedule import schedule_factor
from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.checkpoint import ModelCard, save_checkpoint
from medvit.pipelines.encoder_init import pretraining_encoder
from medvit.pipelines.errors import MedvitError, one_line
from medvit.pipelines.loop import (
    STATE_FILE, EpochLoop, check_steps, epoch_seed, read_state, run_to_end, seed_all, start_process,
)  # fmt: skip
from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW, DEFAULT_SPACING, Preprocessing
from medvit.pipelines.pretrain_data import (
    GLOBAL_SCALE, LOCAL_SCALE, REGION, ViewDataset, ViewSpec, image_files, load_images, load_volumes,
)  # fmt: skip
from medvit.pipelines.runtime import autocast
from medvit.ssl import DINO, METHODS, EncoderFeatures, MoCoV3, SiT, cosine_momentum

# The papers' base LR (scaled by the global batch / 256) and weight decay, AdamW.
BASE_LR = {"moco": 1.5e-4, "dino": 5e-4, "sit": 5e-4}
WEIGHT_DECAY = {"moco": 0.1, "dino": 0.04, "sit": 0.05}
DEFAULT_EPOCHS = 100
GRAD_CLIP = 3.0  # DINO's


@dataclass
class PretrainConfig:
    """Options of `medvit pretrain` (see the CLI for their meaning)."""

    data: list[str | Path]
    out_dir: str | Path
    method: str = "dino"
    model: str = "unetr_base"
    model_args: dict[str, Any] = field(default_factory=dict)
    method_args: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int = 3
    crop: tuple[int, ...] = (96, 96, 96)
    local_crops: int = 4
    spacing: tuple[float, float, float] | None = DEFAULT_SPACING
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 4
    samples_per_volume: int = 8
    lr: float | None = None  # None: BASE_LR[method] x global batch / 256
    weight_decay: float | None = None
    warmup_fraction: float = 0.1
    val_every: int = 1  # checkpoints every N epochs
    workers: int = 0
    device: str = "auto"
    amp: bool = False
    resume: bool = False
    seed: int = 0
    progress: bool = True


@dataclass
class PretrainResult:
    out_dir: Path
    steps: int
    epochs: int
    best_loss: float
    last_loss: float
    main: bool = True  # the process that writes checkpoints and reports (rank 0)


class Pretrainer(EpochLoop):
    """Holds the method, data and optimiser of one pretraining run; `run()` trains to the end."""

    def __init__(self, config: PretrainConfig) -> None:
        self.cfg = config
        if config.method not in METHODS:
            raise MedvitError(f"--method must be one of {', '.join(METHODS)}, got {config.method!r}")
        if config.spatial_dims not in (2, 3) or len(config.crop) != config.spatial_dims:
            raise MedvitError(f"--crop needs {config.spatial_dims} sizes for {config.spatial_dims}D views, got {config.crop}")
        check_steps(config.epochs, config.max_steps, config.batch_size)
        self.world, self.rank, self.device = start_process(config.device)
        self.is_main = self.rank == 0
        self.out = Path(config.out_dir)
        self.split = None
        seed_all(config.seed + self.rank)

        self.crop = tuple(int(c) for c in config.crop)
        self.prep = Preprocessing(spacing=config.spacing, intensity="ct", ct_window=config.ct_window)
        encoder, self.model_args, self.weights = pretraining_encoder(
            config.model, config.model_args, config.spatial_dims, self.crop, in_chans=1
        )
        self.local_size = self._local_size(encoder) if config.method == "dino" else None
        self.method = self._build_method(encoder).to(self.device)
        self.volumes = self._load_data()
        self.train_loader = self._loader()
        steps_per_epoch = max(1, len(self.train_loader))
        epochs = config.epochs if config.epochs is not None or config.max_steps else DEFAULT_EPOCHS
        total = epochs * steps_per_epoch if epochs is not None else config.max_steps
        self.total_steps = min(total, config.max_steps) if config.max_steps else total
        self.val_every = config.val_every
        self.warmup = max(1, int(config.warmup_fraction * self.total_steps))

        wd = WEIGHT_DECAY[config.method] if config.weight_decay is None else config.weight_decay
        self.lr = config.lr if config.lr is not None else BASE_LR[config.method] * config.batch_size * self.world / 256
        self.optimizer = make_optimizer("adamw", param_groups(self._trained(), wd), self.lr, wd)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: schedule_factor("cosine", s, self.total_steps, self.warmup)
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=config.amp and self.device.type == "cuda")
        self.ddp_method: nn.Module = self.method
        if self.world > 1:
            if self.device.type == "cuda":
                self.method = nn.SyncBatchNorm.convert_sync_batchnorm(self.method)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_method = nn.parallel.DistributedDataParallel(self.method, device_ids=ids)
        prep = {"kind": "image", "in_chans": 1, "intensity": "auto"} if self.images else self.prep.to_dict()
        self.card = ModelCard(
            model_name=config.model, model_args=self.model_args, labels={}, preprocessing=prep,
            patch_size=self.crop, task="pretraining",
            slicing={"axis": 2, "slab": 1} if config.spatial_dims == 2 and not self.images else None,
        )  # fmt: skip
        self.step = self.epoch = 0
        self.best = math.inf
        self.last_loss = math.nan
        self._epoch_losses: list[float] = []
        if config.resume:
            self._resume()

    # -- set-up ---------------------------------------------------------------------------
    def _load_data(self) -> list[torch.Tensor]:
        """The volumes (resampled, CT-windowed), or for 2D encoders the images if DATA holds images."""
        images = image_files(self.cfg.data) if self.cfg.spatial_dims == 2 else []
        self.images = bool(images)
        if not images:
            return [v for _, v in load_volumes(self.cfg.data, self.prep)]
        others = [p for p in map(Path, self.cfg.data) if not (p.is_dir() or p in images)]
        if others:
            raise MedvitError.at(others[0], "DATA mixes 2D images and scans; pretrain on one kind")
        return [x for _, x in load_images(images, [round(REGION * c) for c in self.crop])]

    def _local_size(self, encoder: nn.Module) -> tuple[int, ...]:
        """DINO's local view size: half the crop where the encoder takes it (a ViT's patch
        embedding is let take other sizes), else the crop's."""
        patch = tuple(getattr(encoder, "patch_size", (1,) * len(self.crop)))
        half = tuple(max(p, (c // 2) // p * p) for c, p in zip(self.crop, patch))
        features = EncoderFeatures(encoder)
        pe = getattr(encoder, "patch_embed", None)
        if pe is not None and hasattr(pe, "strict_img_size") and not hasattr(encoder, "stage_channels"):
            pe.strict_img_size = False
        try:
            features.dims(torch.zeros(1, 1, *half))
            return half
        except (ValueError, RuntimeError):
            return self.crop

    def _build_method(self, encoder: nn.Module) -> nn.Module:
        pooled, channels, grid = EncoderFeatures(encoder).dims(torch.zeros(1, 1, *self.crop))
        cls: type[nn.Module] = {"moco": MoCoV3, "dino": DINO, "sit": SiT}[self.cfg.method]
        args: dict[str, Any] = {"in_dim": pooled}
        if cls is SiT:
            if self.crop[-1] != self.crop[-2]:
                raise MedvitError(f"--method sit rotates views: the last two --crop sizes must be equal, got {self.crop}")
            args.update(in_chans=1, map_channels=channels, stride=[c // g for c, g in zip(self.crop, grid)])
        known = set(inspect.signature(cls.__init__).parameters) - {"self", "encoder", "in_dim", "in_chans",
                                                                     "map_channels", "stride"}  # fmt: skip
        unknown = sorted(set(self.cfg.method_args) - known)
        if unknown:
            raise MedvitError(f"--method-arg {', '.join(unknown)}: not an option of {self.cfg.method} "
                              f"(it takes {', '.join(sorted(known))})")  # fmt: skip
        try:
            return cls(encoder, **args, **self.cfg.method_args)
        except (ValueError, TypeError) as e:
            raise MedvitError(f"--method-arg: {one_line(str(e))}") from None

    def _trained(self) -> nn.Module:
        """The trained part of the method (the momentum / teacher copies get no gradients)."""
        return self.method

    def _views(self) -> list[ViewSpec]:
        views = [ViewSpec(2, self.crop, GLOBAL_SCALE)]
        if self.cfg.method == "dino" and self.cfg.local_crops > 0:
            views.append(ViewSpec(self.cfg.local_crops, self.local_size, LOCAL_SCALE))
        return views

    def _loader(self) -> DataLoader:
        ds = ViewDataset(self.volumes, self.crop, self._views(), self.cfg.samples_per_volume)
        batch = min(self.cfg.batch_size, len(ds))
        sampler = DistributedSampler(ds, self.world, self.rank, seed=self.cfg.seed) if self.world > 1 else None
        gen = torch.Generator().manual_seed(self.cfg.seed + self.rank)
        return DataLoader(ds, batch_size=batch, sampler=sampler, shuffle=sampler is None, generator=gen,
                          num_workers=self.cfg.workers, drop_last=len(ds) >= 2 * batch)  # fmt: skip

    # -- checkpoints ----------------------------------------------------------------------
    def kept_encoder(self) -> nn.Module:
        """The encoder a checkpoint holds: DINO's teacher, else the trained encoder."""
        return self.method.teacher_encoder if isinstance(self.method, DINO) else self.method.encoder

    def _save(self, name: str) -> None:
        self.card.extra = {
            "method": self.cfg.method, "hyper_parameters": self.method.hyper_parameters(), "weights": self.weights,
            "step": self.step, "epoch": self.epoch, "best_loss": self.best, "last_loss": self.last_loss,
            "crop": list(self.crop), "local_crop": list(self.local_size) if self.local_size else None,
        }  # fmt: skip
        save_checkpoint(self.kept_encoder(), self.card, self.out / f"{name}.safetensors")
        if name == "last":
            state = {
                "method": {k: v.detach().cpu() for k, v in self.method.state_dict().items()},
                "card": self.card.to_json(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "best": self.best, "last_loss": self.last_loss,
            }  # fmt: skip
            write_atomic(self.out / STATE_FILE, lambda tmp: torch.save(state, tmp))

    def _resume(self) -> None:
        state, card, path = read_state(self.out, self.device)
        same = (card.task == "pretraining" and card.model_name == self.cfg.model and card.model_args == self.model_args
                and card.extra.get("method") == self.cfg.method
                and card.extra.get("hyper_parameters") == json.loads(json.dumps(self.method.hyper_parameters())))  # fmt: skip
        if not same:
            raise MedvitError(f"{path}: was pretrained with {card.extra.get('method')} on {card.model_name} "
                              f"{card.model_args}; resume with the same method, model and options")  # fmt: skip
        try:
            self.method.load_state_dict(state["method"])
        except RuntimeError as e:
            raise MedvitError(f"{path}: the state does not fit this run ({one_line(str(e))[:160]})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.best, self.last_loss = float(state["best"]), float(state["last_loss"])

    # -- loop -----------------------------------------------------------------------------
    def _seed_epoch(self) -> None:
        seed = epoch_seed(self.cfg.seed, self.rank, self.epoch)
        seed_all(seed)
        self.train_loader.generator.manual_seed(seed)
        self.train_loader.dataset.set_random_state(seed)
        sampler = self.train_loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        self._epoch_losses = []

    def _momentum(self) -> float:
        return cosine_momentum(self.method.momentum, self.step, self.total_steps)

    def _loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        with autocast(self.device, self.cfg.amp):
            if isinstance(self.method, MoCoV3):
                return self.ddp_method(views[0], views[1], self._momentum())
            if isinstance(self.method, DINO):
                return self.ddp_method(views[:2], views[2:])
            return self.ddp_method(views[0], views[1])

    def _train_step(self, batch: list[torch.Tensor]) -> float:
        views = [v.to(self.device, non_blocking=True) for v in batch]
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss(views)
        if not torch.isfinite(loss):
            raise MedvitError(f"{self.cfg.method} loss is {float(loss)} at step {self.step}; lower --lr")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_([p for p in self.method.parameters() if p.requires_grad], GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if isinstance(self.method, DINO):
            self.method.update_teacher(self._momentum())
        value = float(loss.detach())
        self._epoch_losses.append(value)
        return value

    def _step_scalars(self) -> dict[str, float]:
        if isinstance(self.method, DINO):
            return {"dino/teacher_entropy": self.method.loss_fn.last_entropy,
                    "dino/center_norm": float(self.method.loss_fn.center.norm())}  # fmt: skip
        if isinstance(self.method, SiT):
            return {f"sit/{k}": v for k, v in self.method.last_losses.items()}
        return {"moco/momentum": self._momentum()}

    def _run_info(self) -> dict[str, Any]:
        return {**asdict(self.cfg), "world_size": self.world, "total_steps": self.total_steps, "lr": self.lr,
                "model_args": self.model_args, "weights": self.weights, "local_crop": self.local_size,
                "hyper_parameters": self.method.hyper_parameters(), "scans": len(self.volumes)}  # fmt: skip

    def run(self) -> PretrainResult:
        self.method.train()
        self.run_loop()
        return PretrainResult(self.out, self.step, self.epoch, self.best, self.last_loss, self.is_main)

    def _end_of_epoch(self, writer: SummaryWriter | None) -> None:
        if self._epoch_losses:
            self.last_loss = sum(self._epoch_losses) / len(self._epoch_losses)
        if writer is not None:
            writer.add_scalar("train/epoch_loss", self.last_loss, self.step)
        if self.last_loss < self.best:
            self.best = self.last_loss
            self._save("best")
        self._save("last")


def pretrain(config: PretrainConfig) -> PretrainResult:
    """Pretrain as configured; under torchrun every process calls this."""
    return run_to_end(Pretrainer(config))
