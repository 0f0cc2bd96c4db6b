"""What every training run shares: its process under torchrun, per-epoch seeding, the step loop.

`medvit train` has two trainers (segmentation, `pipelines.train`; classification,
`pipelines.classify_train`); both derive from `EpochLoop`, which writes the run folder's
common files, runs the steps epoch by epoch with TensorBoard logging and a progress bar,
and calls the trainer's own step, seeding and end-of-epoch (validation, checkpoints).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from medvit.pipelines.atomic import remove_temporaries, write_atomic, write_json
from medvit.pipelines.checkpoint import ModelCard
from medvit.pipelines.errors import MedvitError, one_line
from medvit.pipelines.runtime import process_rank, resolve_device
from medvit.pipelines.splits import SPLITS_FILE

STATE_FILE = "last_state.pt"
# Files a run folder gets; a temporary one of these left by a killed run is removed at start.
RUN_FILES = ("last.safetensors", "best.safetensors", STATE_FILE, "config.json", SPLITS_FILE)


def read_state(out: Path, device: torch.device) -> tuple[dict[str, Any], ModelCard, Path]:
    """The resume state of the run in `out`: `(state, its model card, the state file)`.

    Raises:
        MedvitError: No state, or a file that is not one (one line).
    """
    path = out / STATE_FILE
    if not path.exists():
        raise MedvitError(f"{out}: nothing to resume (no {STATE_FILE})")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        card = ModelCard.from_json(state["card"], path)
    except (KeyError, RuntimeError, OSError, EOFError) as e:
        raise MedvitError(f"{path}: not a resumable training state ({one_line(str(e))[:160]})") from None
    return state, card, path


def start_process(device: str) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this training process; under torchrun the process group
    is initialised (NCCL on GPUs, gloo on CPUs) and each process takes its LOCAL_RANK GPU."""
    world, rank, local_rank = process_rank()
    dev = resolve_device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return world, rank, dev


def check_steps(epochs: int | None, max_steps: int | None, batch_size: int) -> None:
    """Refuse a run length or batch size below one."""
    if max_steps is not None and max_steps < 1:
        raise MedvitError(f"--max-steps must be >= 1, got {max_steps}")
    if (epochs is not None and epochs < 1) or batch_size < 1:
        raise MedvitError("--epochs and --batch-size must be >= 1")


def seed_all(seed: int) -> None:
    """Seed torch, numpy and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one epoch of one rank: from (seed, rank, epoch) alone, so a resumed run
    repeats a lost epoch exactly."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


class EpochLoop:
    """The step loop of a training run.

    A subclass has `cfg` (with `progress`, `resume`), `out`, `is_main`, `world`, `step`,
    `epoch`, `total_steps`, `val_every` (epochs between validations), `train_loader`, `scheduler`
    and `split` (None: no splits.json),
    and implements
    `_run_info()` (what `config.json` holds), `_seed_epoch()`, `_train_step(batch) -> loss`
    and `_end_of_epoch(writer)` (validation and checkpoints, on the main process);
    `_step_scalars()` adds TensorBoard scalars to each step's loss and LR.
    """

    def _run_info(self) -> dict[str, Any]:
        raise NotImplementedError

    def _seed_epoch(self) -> None:
        raise NotImplementedError

    def _train_step(self, batch: Any) -> float:
        raise NotImplementedError

    def _end_of_epoch(self, writer: SummaryWriter | None) -> None:
        raise NotImplementedError

    def _step_scalars(self) -> dict[str, float]:
        """Further TensorBoard scalars of the step just taken (name -> value); none by default."""
        return {}

    def run_loop(self) -> None:
        """Train to `total_steps`, validating every `val_every` epochs and at the end."""
        writer = None
        if self.is_main:
            out: Path = self.out
            out.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                remove_temporaries(out / name)
            text = json.dumps(self._run_info(), default=str, indent=2)
            write_atomic(out / "config.json", lambda tmp: tmp.write_text(text))
            if getattr(self, "split", None) is not None:  # runs without validation have no split
                write_json(out / SPLITS_FILE, self.split.splits)
            # Events after the resumed step were logged by the lost part of the run; drop them.
            writer = SummaryWriter(str(out / "tb"), purge_step=self.step + 1 if self.cfg.resume else None)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train",
                   disable=not (self.is_main and self.cfg.progress))  # fmt: skip
        try:
            while self.step < self.total_steps:
                self._seed_epoch()
                for batch in self.train_loader:
                    loss = self._train_step(batch)
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if writer is not None:
                        writer.add_scalar("train/loss", loss, self.step)
                        writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
                        for key, value in self._step_scalars().items():
                            writer.add_scalar(key, value, self.step)
                    if self.step >= self.total_steps:
                        break
                self.epoch += 1
                end = self.step >= self.total_steps
                if self.is_main and (end or self.epoch % self.val_every == 0):
                    self._end_of_epoch(writer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if self.world > 1:
            dist.barrier()


def finish_process(world: int) -> None:
    """Leave the process group a torchrun run started."""
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def run_to_end(trainer: Any) -> Any:
    """`trainer.run()`, leaving the process group afterwards however it ends."""
    try:
        return trainer.run()
    finally:
        finish_process(trainer.world)
