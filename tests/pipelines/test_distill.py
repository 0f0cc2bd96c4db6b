"""Hard-label distillation: the loss by hand, the checks on the teacher, a frozen teacher in training."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from monai.losses import DiceCELoss

from medvit.pipelines.checkpoint import ModelCard, read_card
from medvit.pipelines.distill import HardDistillationLoss, teacher_mismatch
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.phantom import write_phantom_dataset
from medvit.pipelines.train import TrainConfig, Trainer, deep_supervision_loss, train

from helpers import TINY_UNETR_ARGS

MODEL_ARGS = {k: v for k, v in TINY_UNETR_ARGS.items() if k not in ("img_size", "num_classes", "in_chans")}
TEACHER_ARGS = {"features": [4, 8, 8]}


def _hand_dice_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MONAI's DiceCE (softmax, one-hot labels, background included, smoothing 1e-5) written out."""
    p = logits.softmax(1)
    onehot = torch.nn.functional.one_hot(labels[:, 0], logits.shape[1]).movedim(-1, 1).float()
    dims = tuple(range(2, logits.ndim))
    inter = (p * onehot).sum(dims)
    dice = 1 - (2 * inter + 1e-5) / (p.sum(dims) + onehot.sum(dims) + 1e-5)
    return dice.mean() + _hand_ce(logits, labels[:, 0])


def _hand_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over voxels of -log softmax at the target class."""
    logp = logits.log_softmax(1)
    return -logp.gather(1, target[:, None]).mean()


class _Zero(torch.nn.Module):
    def forward(self, output: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return output.new_zeros(())


def test_loss_is_the_hand_computation() -> None:
    torch.manual_seed(1)
    student = torch.randn(2, 3, 4, 4)
    teacher = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 1, 4, 4))
    loss = HardDistillationLoss(DiceCELoss(to_onehot_y=True, softmax=True), 0.3)(student, labels, teacher)
    expected = 0.7 * _hand_dice_ce(student, labels) + 0.3 * _hand_ce(student, teacher.argmax(1))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    # a voxel's distillation term is -log p(student) at the teacher's arg-max: one voxel, two classes
    one = HardDistillationLoss(_Zero(), 1.0)
    value = one(torch.tensor([[[0.0], [2.0]]]), None, torch.tensor([[[5.0], [1.0]]]))  # teacher says class 0
    torch.testing.assert_close(value, torch.log1p(torch.exp(torch.tensor(2.0))))


def test_weight_zero_is_plain_dice_ce_and_deep_supervision_distils_the_main_output() -> None:
    torch.manual_seed(2)
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()
    outs = [torch.randn(2, 3, 8 >> i, 8 >> i, 8 >> i) for i in range(3)]
    teacher = torch.randn(2, 3, 8, 8, 8)
    base = deep_supervision_loss(3)
    torch.testing.assert_close(HardDistillationLoss(base, 0.0)(outs, labels, teacher), base(outs, labels))
    expected = 0.5 * base(outs, labels) + 0.5 * _hand_ce(outs[0], teacher.argmax(1))
    torch.testing.assert_close(HardDistillationLoss(base, 0.5)(outs, labels, teacher), expected)
    with pytest.raises(MedvitError, match="--distill-weight must be between 0 and 1, got 1.5"):
        HardDistillationLoss(base, 1.5)


def _card(**kw) -> ModelCard:
    base = dict(
        model_name="unet_nnunet_3d", model_args={}, labels={1: {"id": 1, "name": "liver"}},
        preprocessing={"spacing": [4.0, 4.0, 4.0], "intensity": "ct"}, patch_size=(32, 32, 32),
    )
    return ModelCard(**{**base, **kw})


def test_teacher_mismatch_names_what_differs() -> None:
    run = _card()
    assert teacher_mismatch(_card(model_name="unetr_tiny", patch_size=(64, 64, 64)), run) is None
    assert "labels" in teacher_mismatch(_card(labels={1: {"id": 1, "name": "hepar"}}), run)
    prep = teacher_mismatch(_card(preprocessing={"spacing": [2.0, 2.0, 2.0], "intensity": "ct"}), run)
    assert prep.startswith("its preprocessing differs") and "spacing [2.0, 2.0, 2.0] vs [4.0, 4.0, 4.0]" in prep
    slab = teacher_mismatch(_card(patch_size=(32, 32), slicing={"axis": 2, "slab": 3}), run)
    assert slab == "it takes 2D slabs of 3 slices along axis 2, this run 3D windows"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 3, seed=5, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


def config(dataset, out, **kw) -> TrainConfig:
    base = dict(
        data=dataset, out_dir=out, model="unetr_tiny", model_args=MODEL_ARGS, max_steps=2,
        patch_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), batch_size=2, samples_per_volume=1,
        lr=1e-3, progress=False,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def teacher(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train(config(dataset, out, model="unet_nnunet_3d", model_args=TEACHER_ARGS, max_steps=1))
    return out / "best.safetensors"


def test_teacher_stays_frozen_while_the_student_learns(dataset, teacher, tmp_path) -> None:
    trainer = Trainer(config(dataset, tmp_path, teacher=teacher, distill_weight=0.25))
    assert isinstance(trainer.loss_fn, HardDistillationLoss) and trainer.loss_fn.weight == 0.25
    t_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    calls = []
    trainer.teacher.register_forward_hook(lambda m, i, o: calls.append((m.training, torch.is_grad_enabled())))
    assert trainer.run().steps == 2
    assert calls == [(False, False)] * 2  # one eval-mode, no-grad forward a step
    assert all(torch.equal(t_before[k], v) for k, v in trainer.teacher.state_dict().items())
    assert not all(torch.equal(s_before[k], v) for k, v in trainer.model.state_dict().items())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    assert all(p.grad is None for p in trainer.teacher.parameters())
    card = read_card(tmp_path / "last.safetensors")
    assert card.extra["distillation"] == {"teacher": "best.safetensors", "weight": 0.25}
    assert card.model_name == "unetr_tiny"


def test_teacher_with_other_labels_is_refused_in_one_line(dataset, teacher, tmp_path) -> None:
    from medvit.pipelines.checkpoint import load_checkpoint, save_checkpoint

    model, card = load_checkpoint(teacher)
    labels = {**card.labels, 1: {"id": card.labels[1]["id"], "name": "hepar"}}
    other = save_checkpoint(model, replace(card, labels=labels), tmp_path / "other.safetensors")
    with pytest.raises(MedvitError) as err:
        Trainer(config(dataset, tmp_path / "run", teacher=other))
    msg = str(err.value)
    assert msg.startswith(f"{other}: cannot teach this run: its labels") and "hepar" in msg and "\n" not in msg
    with pytest.raises(MedvitError, match="--distill-weight must be between 0 and 1"):
        Trainer(config(dataset, tmp_path / "run", teacher=teacher, distill_weight=-0.1))


def test_deeply_supervised_unet_student_with_a_teacher(dataset, teacher, tmp_path) -> None:
    cfg = config(
        dataset, tmp_path, model="unet_nnunet_3d", model_args={"features": [4, 8, 8, 8]}, deep_supervision=True,
        teacher=teacher, max_steps=1,
    )
    trainer = Trainer(cfg)
    assert len(trainer.model.aux_heads) == 1 and trainer.loss_fn.base.weights == pytest.approx([2 / 3, 1 / 3])
    assert trainer.run().steps == 1
