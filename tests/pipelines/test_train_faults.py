"""Training killed at any moment (SIGKILL, even mid-checkpoint) resumes onto the same course."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medvit.pipelines.checkpoint import load_checkpoint, read_card
from medvit.pipelines.phantom import write_phantom_dataset
from medvit.pipelines.train import STATE_FILE, TrainConfig, Trainer, train

from helpers import TINY_UNETR_ARGS

MODEL_ARGS = {k: v for k, v in TINY_UNETR_ARGS.items() if k not in ("img_size", "num_classes", "in_chans")}
EPOCHS, STEPS_PER_EPOCH = 2, 2  # 2 training cases, batch 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Both runs compared reduce in the same order (the killed child runs with one thread too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 3, seed=5, shape=(32, 28, 12), spacing=(3.0, 3.0, 6.0))


def config(dataset: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(dataset), out_dir=str(out), model="unetr_tiny", model_args=MODEL_ARGS, epochs=EPOCHS,
        patch_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), batch_size=1, samples_per_volume=1, lr=1e-3,
        progress=False, val_every=1,  # a checkpoint every epoch to resume from
    )
    base.update(kw)
    return TrainConfig(**base)


def lrs(run: Path) -> dict[int, float]:
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/lr")}


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / STATE_FILE, weights_only=True)["model"]


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("full")
    assert train(config(dataset, run)).steps == EPOCHS * STEPS_PER_EPOCH
    return run


# Runs training in a child process that SIGKILLs itself: at the start of a given step,
# or while the n-th resume state is being written (half of it on disk, not yet renamed).
DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import torch
    from medvit.pipelines import train as T

    mode, when, cfg = sys.argv[1], int(sys.argv[2]), T.TrainConfig(**json.loads(sys.argv[3]))
    if mode == "step":
        real_step = T.Trainer._train_step

        def step(self, batch):
            if self.step == when:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, batch)

        T.Trainer._train_step = step
    else:
        real_save, saves = torch.save, []

        def save(obj, f, *args, **kwargs):
            saves.append(f)
            real_save(obj, f, *args, **kwargs)
            if len(saves) == when:
                data = Path(f).read_bytes()
                Path(f).write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save
    T.train(cfg)
""")


def kill_run(tmp_path: Path, cfg: TrainConfig, mode: str, when: int) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    payload = json.dumps(dataclasses.asdict(cfg))
    proc = subprocess.run([sys.executable, str(driver), mode, str(when), payload], capture_output=True, text=True,
                          timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.mark.parametrize("mode", ["step", "checkpoint"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(dataset, uninterrupted, tmp_path, monkeypatch, mode) -> None:
    run = tmp_path / "run"
    total = EPOCHS * STEPS_PER_EPOCH
    # after the first checkpoint (end of epoch 1), at a random point
    when = random.randrange(STEPS_PER_EPOCH, total) if mode == "step" else random.randrange(2, EPOCHS + 1)
    kill_run(tmp_path, config(dataset, run), mode, when)
    why = f"killed in mode {mode} at {when}"

    # nothing under a real name is partial: both files load whole
    state = torch.load(run / STATE_FILE, weights_only=True)
    saved_step = int(state["step"])
    assert saved_step % STEPS_PER_EPOCH == 0 and 0 < saved_step < total, why
    if mode == "checkpoint":
        assert saved_step == (when - 1) * STEPS_PER_EPOCH, why  # the state being written was lost, the one before kept
        assert any(p.name.startswith(".tmp-") for p in run.iterdir()), why
    load_checkpoint(run / "last.safetensors")

    calls = []
    real_step = Trainer._train_step
    monkeypatch.setattr(Trainer, "_train_step", lambda self, batch: calls.append(self.step) or real_step(self, batch))
    result = train(config(dataset, run, resume=True))
    assert (result.steps, result.epochs) == (total, EPOCHS), why
    assert calls == list(range(saved_step, total)), why  # continued, not started over
    assert not [p.name for p in run.iterdir() if p.name.startswith(".tmp-")], why

    # same schedule, same step count, and (same seeds per epoch, same optimiser state) same weights
    assert lrs(run) == pytest.approx(lrs(uninterrupted), rel=1e-6), why
    assert sorted(lrs(run)) == list(range(1, total + 1)), why
    assert read_card(run / "last.safetensors").extra["step"] == total
    full, resumed = weights(uninterrupted), weights(run)
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{why}: {key}: {m}")


def test_resume_without_a_state_is_refused(dataset, tmp_path) -> None:
    from medvit.pipelines.errors import MedvitError

    with pytest.raises(MedvitError, match="nothing to resume"):
        train(config(dataset, tmp_path, resume=True))
    (tmp_path / STATE_FILE).write_bytes(b"PK\x03\x04 not a state")
    with pytest.raises(MedvitError, match="not a resumable training state"):
        train(config(dataset, tmp_path, resume=True))
