"""DINO: self-distillation with no labels.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, as
their code (facebookresearch/dino): a student and a momentum teacher (an EMA of the
student, no gradients), each an encoder with the DINO head (an MLP to a bottleneck, L2
normalisation, a weight-normalised last layer whose norm is fixed at 1); the teacher sees
the 2 global crops, the student every crop (2 global + k local, 2D or 3D); the loss is the
cross-entropy `-softmax((t - center) / tt) . log_softmax(s / ts)` averaged over every
(teacher crop, other student crop) pair, and the centre follows the teacher's batch means,
`center = m * center + (1 - m) * mean(teacher_out)`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from medvit.ssl.common import ema_update, mean_all
from medvit.ssl.features import EncoderFeatures


class DINOHead(nn.Module):
    """MLP (GELU) to a bottleneck, L2 normalisation, weight-normalised last layer (no bias).

    Args:
        in_dim: Encoder output width.
        out_dim: Prototypes (the softmax's width).
        hidden_dim: MLP hidden width.
        bottleneck_dim: Width before the last layer.
        nlayers: MLP layers (1: one Linear to the bottleneck).
        norm_last_layer: Fix the last layer's weight norm `g` at 1 (not trained).
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True) -> None:  # fmt: skip
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class DINOLoss(nn.Module):
    """DINO's cross-entropy between centred, sharpened teacher and student distributions.

    Args:
        out_dim: Head output width.
        student_temp: Student softmax temperature.
        teacher_temp: Teacher softmax temperature.
        center_momentum: Momentum of the centre.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, teacher_temp: float = 0.04,
                 center_momentum: float = 0.9) -> None:  # fmt: skip
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.last_entropy = 0.0

    def forward(self, student_out: Sequence[torch.Tensor], teacher_out: Sequence[torch.Tensor],
                update_center: bool = True) -> torch.Tensor:  # fmt: skip
        """Loss over every (teacher crop i, student crop v != i) pair; then the centre moves.

        Args:
            student_out: Head outputs per crop, the global crops first, each `(B, out_dim)`.
            teacher_out: Head outputs of the global crops.
            update_center: Move the centre towards the teacher's batch mean afterwards.
        """
        teacher = [F.softmax((t.detach() - self.center) / self.teacher_temp, dim=-1) for t in teacher_out]
        total, terms = 0.0, 0
        for i, q in enumerate(teacher):
            for v, s in enumerate(student_out):
                if v == i:
                    continue
                total = total + torch.sum(-q * F.log_softmax(s / self.student_temp, dim=-1), dim=-1).mean()
                terms += 1
        with torch.no_grad():
            p = torch.cat(teacher)
            self.last_entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
        if update_center:
            self.update_center(torch.cat([t.detach() for t in teacher_out]))
        return total / max(terms, 1)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """`center = m * center + (1 - m) * mean(teacher_out)` (the mean over every process)."""
        batch_center = mean_all(teacher_out.float().mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class DINO(nn.Module):
    """DINO around an encoder.

    Args:
        encoder: A registered backbone (or a segmenter's encoder); the student, trained in place.
        out_dim: Head output width (65536 in the paper).
        hidden_dim: Head MLP width.
        bottleneck_dim: Head bottleneck width.
        student_temp: Student temperature.
        teacher_temp: Teacher temperature.
        center_momentum: Centre momentum.
        momentum: Base teacher EMA momentum (raised to 1 on a cosine by the trainer).
        norm_last_layer: Fix the last layer's weight norm.
        in_dim: Width of the encoder's pooled vector; None: `encoder.num_features`.
    """

    def __init__(self, encoder: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 student_temp: float = 0.1, teacher_temp: float = 0.04, center_momentum: float = 0.9,
                 momentum: float = 0.996, norm_last_layer: bool = True, in_dim: int | None = None) -> None:  # fmt: skip
        super().__init__()
        in_dim = int(in_dim or encoder.num_features)
        self.momentum = momentum
        self.student = EncoderFeatures(encoder)
        self.student_head = DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        self.teacher = copy.deepcopy(self.student)
        self.teacher_head = copy.deepcopy(self.student_head)
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        self.loss_fn = DINOLoss(out_dim, student_temp, teacher_temp, center_momentum)
        self._hyper = dict(out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                           student_temp=student_temp, teacher_temp=teacher_temp, center_momentum=center_momentum,
                           momentum=momentum, norm_last_layer=norm_last_layer)  # fmt: skip

    @property
    def encoder(self) -> nn.Module:
        """The student encoder."""
        return self.student.encoder

    @property
    def teacher_encoder(self) -> nn.Module:
        """The teacher encoder (what pretraining keeps, as DINO evaluates it)."""
        return self.teacher.encoder

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.student.parameters()) + list(self.student_head.parameters())

    def teacher_parameters(self) -> list[nn.Parameter]:
        return list(self.teacher.parameters()) + list(self.teacher_head.parameters())

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """Teacher `= m * teacher + (1 - m) * student` (after the optimiser step)."""
        ema_update(self.teacher_parameters(), self.student_parameters(), m)

    def _heads(self, crops: Sequence[torch.Tensor], encoder: nn.Module, head: nn.Module) -> list[torch.Tensor]:
        """Head outputs per crop; crops of one size go through the encoder in one batch."""
        out: list[torch.Tensor | None] = [None] * len(crops)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(crops):
            groups.setdefault(tuple(c.shape[1:]), []).append(i)
        for idx in groups.values():
            y = head(encoder(torch.cat([crops[i] for i in idx]))[0])
            for i, part in zip(idx, y.chunk(len(idx))):
                out[i] = part
        return out  # type: ignore[return-value]

    def forward(self, global_crops: Sequence[torch.Tensor], local_crops: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """The loss of one batch: 2 global crops (teacher and student), local crops (student)."""
        if len(global_crops) != 2:
            raise ValueError(f"DINO takes 2 global crops, got {len(global_crops)}")
        with torch.no_grad():
            teacher_out = self._heads(global_crops, self.teacher, self.teacher_head)
        student_out = self._heads([*global_crops, *local_crops], self.student, self.student_head)
        return self.loss_fn(student_out, teacher_out)

    def hyper_parameters(self) -> dict[str, float | int | bool]:
        return dict(self._hyper)
