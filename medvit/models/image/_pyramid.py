"""Interface shared by the four-stage Pyramid Vision Transformers (PVT v1, PVT v2 / MiT).

The configuration checks, the classifier, `reset_classifier` and `forward` are the same for
both families; only the stages, the pooling of `forward_head` and the pooling types allowed
differ. The base class holds no
parameters, so the models' parameters and state_dict keys are their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import check_spatial_dims, to_ntuple
from medvit.layers.sra import stage_mlp_ratios


class PyramidBackbone(nn.Module):
    """Base of the PVT classifiers/backbones: strides 4, 8, 16, ... and a linear head.

    A subclass sets `pool_types`, calls `_configure` before building its stages and
    `reset_classifier` after, and defines `forward_features` and `forward_head`.
    """

    pool_types: tuple[str, ...] = ()
    stages: nn.Module

    def _configure(
        self,
        img_size: int | Sequence[int],
        in_chans: int,
        num_classes: int,
        global_pool: str,
        depth: Sequence[int],
        embed_dim: Sequence[int],
        num_heads: Sequence[int],
        sr_ratios: Sequence[int],
        mlp_ratio: float | Sequence[float],
        *,
        spatial_dims: int,
    ) -> tuple[float, ...]:
        """Check the arguments, set the interface attributes; the MLP ratio of every stage.

        Raises:
            ValueError: A bad dimension count, pooling type or per-stage configuration.
        """
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.global_pool = self._check_pool(global_pool)
        ratios = stage_mlp_ratios(depth, embed_dim, num_heads, sr_ratios, mlp_ratio)
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.stage_channels = list(embed_dim)
        self.stage_strides = [4 * 2**i for i in range(len(depth))]
        self.num_features = embed_dim[-1]
        return ratios

    def _check_pool(self, global_pool: str) -> str:
        if global_pool not in self.pool_types:
            allowed = " or ".join(repr(p) for p in self.pool_types)
            raise ValueError(f"global_pool must be {allowed}, got {global_pool!r}")
        return global_pool

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            self.global_pool = self._check_pool(global_pool)
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
