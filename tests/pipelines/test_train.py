"""Training pipeline: steps, schedule, checkpoints with cards, TensorBoard, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from monai.losses import DiceCELoss
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medvit.optim.schedule import lr_factor
from medvit.pipelines.checkpoint import load_checkpoint, read_card
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.phantom import write_phantom_dataset
from medvit.pipelines.runtime import cpu_has_bf16
from medvit.pipelines.train import TrainConfig, Trainer, deep_supervision_loss, train

from helpers import TINY_UNETR_ARGS

MODEL_ARGS = {k: v for k, v in TINY_UNETR_ARGS.items() if k not in ("img_size", "num_classes", "in_chans")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return write_phantom_dataset(root, 3, seed=5, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


def config(dataset, out, **kw) -> TrainConfig:
    base = dict(
        data=dataset, out_dir=out, model="unetr_tiny", model_args=MODEL_ARGS, epochs=3,
        patch_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), batch_size=2, samples_per_volume=1,
        lr=1e-3, progress=False, val_every=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_then_cosine() -> None:
    lrs = [lr_factor(s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, 10) == pytest.approx(0.0)


@pytest.mark.parametrize("epochs, max_steps, total", [(None, 5, 5), (2, None, 2), (2, 5, 2), (9, 5, 5), (None, None, 100)])
def test_training_length_from_epochs_and_max_steps(dataset, tmp_path, epochs, max_steps, total) -> None:
    # 2 training cases, batch 2: one step an epoch; --max-steps alone is the whole length
    assert Trainer(config(dataset, tmp_path, epochs=epochs, max_steps=max_steps)).total_steps == total


def test_short_epochs_validate_every_250_steps_by_default(dataset, tmp_path) -> None:
    """An epoch of two cases is one step: validating (and writing two checkpoints) after each
    would cost more than training; by default it waits for 250 steps' worth of epochs."""
    assert Trainer(config(dataset, tmp_path, epochs=2, val_every=None)).val_every == 250
    assert Trainer(config(dataset, tmp_path, epochs=2, batch_size=1, val_every=None)).val_every == 125
    assert Trainer(config(dataset, tmp_path, epochs=2, val_every=1)).val_every == 1
    with pytest.raises(MedvitError, match="--val-every must be >= 1"):
        Trainer(config(dataset, tmp_path, val_every=0))


def test_train_writes_checkpoints_card_and_tensorboard(dataset, tmp_path) -> None:
    result = train(config(dataset, tmp_path, epochs=2, val_every=1))
    assert result.steps == 2 and result.epochs == 2  # 2 training cases, batch 2: 1 step an epoch
    for name in ("last.safetensors", "best.safetensors", "last_state.pt", "config.json"):
        assert (tmp_path / name).exists(), name
    card = read_card(tmp_path / "last.safetensors")
    assert card.model_name == "unetr_tiny" and card.patch_size == (32, 32, 32)
    assert card.label_names() == {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
    assert card.preprocessing["spacing"] == [4.0, 4.0, 4.0] and card.preprocessing["intensity"] == "ct"
    assert card.extra["step"] == 2 and set(card.extra["last_dice"]) == set(card.label_names().values())
    model, _ = load_checkpoint(tmp_path / "last.safetensors")
    assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 5, 32, 32, 32)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 4})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/lr", "val/mean_dice", "val/dice_liver"} <= set(tags["scalars"])
    assert "val/prediction" in tags["images"]
    assert len(events.Scalars("train/loss")) == 2
    assert [e.step for e in events.Scalars("val/mean_dice")] == [1, 2]  # every epoch, as asked


def test_loss_decreases_when_overfitting(dataset, tmp_path) -> None:
    result = train(config(dataset, tmp_path, epochs=12, val_every=12, lr=3e-3))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert result.steps == 12


def test_resume_continues_the_schedule(dataset, tmp_path, monkeypatch) -> None:
    full = tmp_path / "full"
    train(config(dataset, full, epochs=4))
    part = tmp_path / "part"
    calls = {"n": 0}
    original = Trainer._train_step

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(config(dataset, part, epochs=4))
    monkeypatch.setattr(Trainer, "_train_step", original)
    assert read_card(part / "last.safetensors").extra["step"] == 2
    result = train(config(dataset, part, epochs=4, resume=True))
    assert result.steps == 4

    def lrs(run):
        ev = EventAccumulator(str(run / "tb"))
        ev.Reload()
        return {e.step: e.value for e in ev.Scalars("train/lr")}

    full_lr, part_lr = lrs(full), lrs(part)
    assert part_lr[3] == pytest.approx(full_lr[3]) and part_lr[4] == pytest.approx(full_lr[4])


def test_bad_training_settings(dataset, tmp_path) -> None:
    with pytest.raises(MedvitError, match="nothing to resume"):
        train(config(dataset, tmp_path / "empty", resume=True))
    with pytest.raises(MedvitError, match="cannot build model"):
        train(config(dataset, tmp_path / "x", patch_size=(30, 32, 32)))
    with pytest.raises(MedvitError, match="max-steps"):
        train(config(dataset, tmp_path / "y", max_steps=0))


def test_ddp_two_cpu_processes_with_gloo(dataset, tmp_path) -> None:
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "medvit.cli", "train", str(dataset), "-o", str(out), "--model", "unetr_tiny",
        "--model-arg", "feature_size=4", "--model-arg", "skip_indices=[0,1,2]",
        "--model-arg", 'encoder_args={"embed_dim": 32, "depth": 3, "num_heads": 2}',
        "--patch-size", "32", "32", "32", "--spacing", "4", "4", "4", "--epochs", "2",
        "--batch-size", "1", "--samples-per-volume", "1", "--device", "cpu", "-q",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((out / "config.json").read_text())
    assert info["world_size"] == 2
    assert info["precision"] == ("bfloat16" if cpu_has_bf16() else "float32")  # `--amp` on where the CPU has it
    assert read_card(out / "last.safetensors").extra["step"] == info["total_steps"] == 4
    assert "trained 4 steps" in proc.stdout


def test_deep_supervision_loss_is_nnunet_weighted_dice_ce_on_nearest_downsampled_labels() -> None:
    torch.manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 16, 16, 8)).float()
    outs = [torch.randn(2, 3, 16 >> i, 16 >> i, 8 >> i) for i in range(3)]
    # nearest neighbour of a factor-f downsampling: the voxel at f*j + f//2 (centre-aligned)
    targets = [label, label[:, :, 1::2, 1::2, 1::2], label[:, :, 2::4, 2::4, 2::4]]
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    expected = sum(w * dice_ce(o, t) for w, o, t in zip((4 / 7, 2 / 7, 1 / 7), outs, targets))
    assert torch.allclose(deep_supervision_loss(3)(outs, label), expected, rtol=1e-6, atol=0)
    assert deep_supervision_loss(3).weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_deep_supervision_trains_aux_heads_and_records_them_in_the_card(dataset, tmp_path) -> None:
    trainer = Trainer(config(dataset, tmp_path, epochs=1, deep_supervision=True))
    assert trainer.model_args["deep_supervision"] is True and len(trainer.model.aux_heads) == 2
    assert trainer.loss_fn.weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    before = trainer.model.aux_heads[1].weight.detach().clone()
    trainer.run()
    assert not torch.equal(before, trainer.model.aux_heads[1].weight)
    assert read_card(tmp_path / "last.safetensors").model_args["deep_supervision"] is True
    model, _ = load_checkpoint(tmp_path / "last.safetensors")
    assert len(model.aux_heads) == 2 and not model.training


def test_deep_supervision_needs_a_multi_scale_decoder(dataset, tmp_path) -> None:
    with pytest.raises(MedvitError) as err:
        Trainer(config(dataset, tmp_path, model="segformer_b0", model_args={}, deep_supervision=True))
    assert str(err.value) == "--deep-supervision needs a decoder with several scales; segformer_b0 has one"
