"""Hard-label distillation of a segmenter from a teacher checkpoint (`medvit train --teacher`).

DeiT's hard-label distillation (Touvron et al., "Training data-efficient image transformers
& distillation through attention", ICML 2021) trains the student on the average of the
loss against the ground truth and the cross-entropy against the teacher's arg-max. Here,
per voxel and with the segmentation loss in place of the first cross-entropy:

    loss = (1 - W) * DiceCE(student, labels) + W * CE(student, argmax(teacher logits))

W = 0.5 is DeiT's rule. The teacher sees the same augmented batch as the student, in eval
mode and without gradients; a deeply supervised student gets the distillation term on its
main (full-resolution) output only. DeiT adds a distillation token for the second term; a
segmenter has no token, so both terms train the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.pipelines.checkpoint import ModelCard, load_checkpoint
from medvit.pipelines.errors import MedvitError, short_reason

DEFAULT_DISTILL_WEIGHT = 0.5


def check_weight(weight: float) -> float:
    """`weight` if it is in [0, 1].

    Raises:
        MedvitError: It is not.
    """
    if not 0.0 <= weight <= 1.0:
        raise MedvitError(f"--distill-weight must be between 0 and 1, got {weight}")
    return float(weight)


class HardDistillationLoss(nn.Module):
    """`(1 - weight) * base(output, labels) + weight * CE(main output, argmax(teacher_logits))`.

    Args:
        base: The segmentation loss against the ground truth (DiceCE, or the deep
            supervision loss over a list of outputs, full resolution first).
        weight: W in [0, 1].

    Raises:
        MedvitError: `weight` outside [0, 1].
    """

    def __init__(self, base: nn.Module, weight: float = DEFAULT_DISTILL_WEIGHT) -> None:
        super().__init__()
        self.base = base
        self.weight = check_weight(weight)

    def forward(
        self, output: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, teacher_logits: torch.Tensor
    ) -> torch.Tensor:
        """Student `output` (B, C, *grid) or a list of them, `labels` (B, 1, *grid), teacher (B, C, *grid)."""
        main = output[0] if isinstance(output, (list, tuple)) else output
        hard = teacher_logits.argmax(1)
        distill = F.cross_entropy(main.float(), hard)
        return (1.0 - self.weight) * self.base(output, labels) + self.weight * distill


def _plain(value: Any) -> Any:
    """As JSON gives it back: tuples as lists, int keys as strings."""
    return json.loads(json.dumps(value, sort_keys=True))


def _clip(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _input_of(card: ModelCard) -> str:
    if card.slicing:
        return f"2D slabs of {card.slicing['slab']} slices along axis {card.slicing['axis']}"
    return f"{len(card.patch_size)}D windows"


def teacher_mismatch(teacher: ModelCard, run: ModelCard) -> str | None:
    """What makes `teacher` unusable for a run that writes `run`: labels, preprocessing or input; None if nothing."""
    if _plain(teacher.labels) != _plain(run.labels):
        return f"its labels {_clip(teacher.label_names())} are not this run's {_clip(run.label_names())}"
    t_prep, r_prep = _plain(teacher.preprocessing), _plain(run.preprocessing)
    if t_prep != r_prep:
        keys = sorted(k for k in set(t_prep) | set(r_prep) if t_prep.get(k) != r_prep.get(k))
        diffs = "; ".join(f"{k} {_clip(t_prep.get(k), 30)} vs {_clip(r_prep.get(k), 30)}" for k in keys)
        return f"its preprocessing differs from this run's ({diffs})"
    if _input_of(teacher) != _input_of(run):
        return f"it takes {_input_of(teacher)}, this run {_input_of(run)}"
    return None


def load_teacher(path: str | Path, run: ModelCard, device: torch.device) -> nn.Module:
    """Load a teacher checkpoint for a run whose card is `run`: eval mode, frozen, on `device`.

    The teacher must have the run's labels, preprocessing and input (dimensions, slab and
    slice axis), and must run on the run's window (`run.patch_size`); it is tried on one.

    Raises:
        MedvitError: Unreadable checkpoint, or a teacher that does not fit, in one line
            naming what differs.
    """
    path = Path(path)
    model, card = load_checkpoint(path, device=device)
    problem = teacher_mismatch(card, run)
    if problem:
        raise MedvitError.at(path, f"cannot teach this run: {problem}")
    model.requires_grad_(False).eval()
    in_chans = run.slicing["slab"] if run.slicing else 1
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, *run.patch_size, device=device))
    except (RuntimeError, ValueError) as e:
        raise MedvitError.at(
            path, f"cannot teach this run: it does not run on {tuple(run.patch_size)} windows ({short_reason(e)})"
        ) from None
    return model

