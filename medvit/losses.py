"""Training losses that need more than `(logits, target)`.

Hard-label distillation is from Touvron et al., "Training data-efficient image
transformers & distillation through attention", ICML 2021 (DeiT).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class HardDistillationLoss(nn.Module):
    """DeiT's hard-label distillation: `(1 - alpha) CE(cls, y) + alpha CE(dist, argmax teacher)`.

    The class head learns the labels, the distillation head the teacher's top-1 class.
    Use it with a distilled model in distilled training (`set_distilled_training()`),
    whose training forward returns `(cls_logits, dist_logits)`.

    The teacher is kept in eval mode (also when this loss is put in train mode) and run
    without gradients.

    Args:
        teacher: Model whose logits on the same inputs give the distillation targets;
            None when the caller passes `teacher_logits` (precomputed or from another process).
        alpha: Weight of the distillation term (DeiT: 0.5).
    """

    def __init__(self, teacher: nn.Module | None = None, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.teacher = teacher
        self.alpha = alpha
        if teacher is not None:
            teacher.eval()

    def train(self, mode: bool = True) -> HardDistillationLoss:
        super().train(mode)
        # the teacher's BN/dropout must not switch to training with the student's loop
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(
        self,
        outputs: tuple[torch.Tensor, torch.Tensor],
        labels: torch.Tensor,
        inputs: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of one batch.

        Args:
            outputs: `(cls_logits, dist_logits)`, each `(B, num_classes)`.
            labels: Class indices `(B,)`, or class probabilities `(B, num_classes)` (mixup,
                label smoothing), for the class head.
            inputs: The batch the student saw, for the teacher; give this or `teacher_logits`.
            teacher_logits: The teacher's logits `(B, num_classes)` on that batch.

        Returns:
            The scalar loss.

        Raises:
            ValueError: `outputs` is not a pair, or the teacher's targets cannot be formed.
        """
        if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
            raise ValueError(
                "HardDistillationLoss needs (cls_logits, dist_logits): call the model's "
                "set_distilled_training() and keep it in train mode"
            )
        cls_logits, dist_logits = outputs
        if (inputs is None) == (teacher_logits is None):
            raise ValueError("give exactly one of inputs (for the teacher) and teacher_logits")
        if teacher_logits is None:
            if self.teacher is None:
                raise ValueError("no teacher: pass teacher_logits, or build the loss with a teacher")
            with torch.no_grad():
                teacher_logits = self.teacher(inputs)
        if teacher_logits.shape != dist_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match the distillation "
                f"head's {tuple(dist_logits.shape)}"
            )
        base = F.cross_entropy(cls_logits, labels)
        distill = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
        return (1.0 - self.alpha) * base + self.alpha * distill
