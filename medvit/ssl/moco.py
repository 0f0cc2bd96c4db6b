"""MoCo v3: momentum contrast for ViTs.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV
2021, as their code (facebookresearch/moco-v3): a base encoder with a 3-layer projector and
a 2-layer predictor, a momentum encoder and projector (an EMA of the base, no gradients),
and the symmetric loss `ctr(q1, k2) + ctr(q2, k1)`, `ctr(q, k) = CE(q k^T / T, labels) * 2T`
over L2-normalised vectors, the keys of every process as negatives. The random patch
projection of a ViT is frozen (the paper's stability trick), by default.

The two views go through the encoders in one batch, so BatchNorm in the heads sees 2N
samples (and a batch of one still trains).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.ssl.common import build_mlp, ema_update, gather_all, world
from medvit.ssl.features import EncoderFeatures


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's `ctr(q, k)`: cross-entropy of `q k^T / T` (normalised rows; the keys of every
    process) against each query's own key, times `2T`."""
    q = F.normalize(q, dim=1)
    k = F.normalize(gather_all(k), dim=1)
    logits = q @ k.t() / temperature
    _, rank = world()
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    return F.cross_entropy(logits, labels) * (2 * temperature)


def is_plain_vit(encoder: nn.Module) -> bool:
    """A single-scale ViT: a patch embedding and no stages."""
    return hasattr(encoder, "patch_embed") and not hasattr(encoder, "stage_channels")


class MoCoV3(nn.Module):
    """MoCo v3 around an encoder.

    Args:
        encoder: A registered backbone (or a segmenter's encoder); trained in place.
        dim: Output width of projector and predictor.
        mlp_dim: Hidden width of projector and predictor.
        T: Softmax temperature (0.2 for ViTs).
        momentum: Base momentum of the key encoder (raised to 1 on a cosine by the trainer).
        freeze_patch_embed: Keep the patch projection at its random initialisation; None:
            for single-scale ViTs.
        in_dim: Width of the encoder's pooled vector; None: `encoder.num_features`.
    """

    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 256,
        mlp_dim: int = 4096,
        T: float = 0.2,
        momentum: float = 0.99,
        freeze_patch_embed: bool | None = None,
        in_dim: int | None = None,
    ) -> None:
        super().__init__()
        if T <= 0:
            raise ValueError(f"temperature must be > 0, got {T}")
        self.T = T
        self.momentum = momentum
        if freeze_patch_embed is None:
            freeze_patch_embed = is_plain_vit(encoder)
        self.frozen_patch_embed = bool(freeze_patch_embed)
        if self.frozen_patch_embed:
            encoder.patch_embed.requires_grad_(False)
        in_dim = int(in_dim or encoder.num_features)
        self.base = EncoderFeatures(encoder)
        self.projector = build_mlp(3, in_dim, mlp_dim, dim)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_base = copy.deepcopy(self.base)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    @property
    def encoder(self) -> nn.Module:
        """The base encoder (what pretraining keeps)."""
        return self.base.encoder

    def base_parameters(self) -> list[nn.Parameter]:
        return list(self.base.parameters()) + list(self.projector.parameters())

    def momentum_parameters(self) -> list[nn.Parameter]:
        return list(self.momentum_base.parameters()) + list(self.momentum_projector.parameters())

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """Momentum encoder and projector `= m * momentum + (1 - m) * base`."""
        ema_update(self.momentum_parameters(), self.base_parameters(), m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float | None = None) -> torch.Tensor:
        """The symmetric loss of two views; with `m`, the momentum update comes first (as the
        official code)."""
        n = x1.shape[0]
        q = self.predictor(self.projector(self.base(torch.cat([x1, x2]))[0]))
        with torch.no_grad():
            if m is not None:
                self.update_momentum(m)
            k = self.momentum_projector(self.momentum_base(torch.cat([x1, x2]))[0])
        q1, q2, k1, k2 = q[:n], q[n:], k[:n], k[n:]
        return contrastive_loss(q1, k2, self.T) + contrastive_loss(q2, k1, self.T)

    def hyper_parameters(self) -> dict[str, float | int | bool]:
        return dict(dim=self.predictor[-1].out_features, mlp_dim=self.projector[0].out_features, T=self.T,
                    momentum=self.momentum, freeze_patch_embed=self.frozen_patch_embed)  # fmt: skip
