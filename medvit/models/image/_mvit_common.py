"""What MViT v1 (`mvit`), MViT v2 (`mvitv2`) and the video MViT share.

Both papers stack pre-norm pooling-attention blocks into stages whose first block pools its
queries (and the block shortcut); they differ in the attention, the block and the stem. This
module holds the rest once: argument checks, the pooled shortcut, the final norm and
classifier, and the common backbone interface over per-stage outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn

from medvit.models._features import TokenPoolHead, feature_take_last


def check_network_stride(img_size: tuple[int, ...], stride: int | Sequence[int]) -> None:
    """Raise unless the total stride of stem and stages divides every input axis.

    Args:
        img_size: Input size, one entry per axis.
        stride: Total stride, one for all axes or one per axis.
    """
    strides = [stride] * len(img_size) if isinstance(stride, int) else list(stride)
    if any(s % t for s, t in zip(img_size, strides)):
        shown = stride if isinstance(stride, int) else tuple(stride)
        raise ValueError(f"the network stride {shown} does not divide img_size {img_size}")


def check_input_size(x: torch.Tensor, img_size: tuple[int, ...], tables: str) -> None:
    """Raise unless `x` has the size the position tables were built for.

    Args:
        x: Input `(B, C, *size)`.
        img_size: The size the model was built for.
        tables: The tables that fix the size, for the message (`the position table is`).
    """
    if tuple(x.shape[2:]) != img_size:
        raise ValueError(
            f"input size {tuple(x.shape[2:])} differs from img_size {img_size}, which {tables} built for"
        )


def shortcut_pool(spatial_dims: int, stride_q: Sequence[int]) -> nn.Module | None:
    """Max pool that brings a block's shortcut onto its pooled query grid; None without pooling.

    Args:
        spatial_dims: 2 or 3.
        stride_q: The block's query stride (empty: no pooling).
    """
    if not len(stride_q) or max(stride_q) == 1:
        return None
    kernel = [s + 1 if s > 1 else s for s in stride_q]
    pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
    return pool(kernel, tuple(stride_q), [k // 2 for k in kernel])


def pool_tokens(
    pool: nn.Module | None, x: torch.Tensor, feat_size: Sequence[int], has_cls_token: bool = False
) -> torch.Tensor:
    """Apply `pool` to the grid tokens of `x` `(B, N, C)`; a leading class token passes through."""
    if pool is None:
        return x
    if has_cls_token:
        cls_tok, x = x[:, :1], x[:, 1:]
    b, _, c = x.shape
    x = pool(x.transpose(1, 2).reshape(b, c, *feat_size)).flatten(2).transpose(1, 2)
    return torch.cat((cls_tok, x), dim=1) if has_cls_token else x


class MultiScaleBackbone(TokenPoolHead, nn.Module):
    """Interface of the MViT families: pooling head, classifier reset and stage outputs.

    A subclass builds `patch_embed` and its blocks, appends one entry per stage to
    `stage_channels` and `stage_strides`, calls `_build_head` with the final width, and
    implements `_embed` (input to tokens and grid) and `_forward_stage`.

    Args:
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: One of `pool_types`.
        depth: Blocks per stage.
        spatial_dims: Number of grid axes.
        class_token: The tokens start with a class token.
    """

    pool_types: tuple[str, ...] = ("token", "avg", "")

    def __init__(
        self,
        in_chans: int,
        num_classes: int,
        global_pool: str,
        depth: Sequence[int],
        *,
        spatial_dims: int,
        class_token: bool = False,
    ) -> None:
        super().__init__()
        self._check_pool(global_pool, class_token)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if len(depth) < 1 or min(depth) < 1:
            raise ValueError(f"depth must list >= 1 blocks per stage, got {tuple(depth)}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.spatial_dims = spatial_dims
        self.num_prefix_tokens = 1 if class_token else 0
        self.stage_channels: list[int] = []
        self.stage_strides: list[int] = []

    def _check_pool(self, global_pool: str, class_token: bool) -> None:
        if global_pool not in self.pool_types:
            raise ValueError(f"global_pool must be one of {self.pool_types}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs a class token (class_token=True)")

    def _build_head(self, dim: int, num_classes: int, drop_rate: float,
                    norm_layer: type[nn.Module] | partial) -> None:
        self.num_features = dim
        self.norm = norm_layer(dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def _init_linear(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        raise NotImplementedError

    def _forward_stage(self, i: int, x: torch.Tensor, feat_size: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (class token first, if any) of the last stage after the final norm, `(B, N, D)`."""
        x, feat_size = self._embed(x)
        for i in range(len(self.stage_channels)):
            x, feat_size = self._forward_stage(i, x, feat_size)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-stage outputs (strides `stage_strides`, widths `stage_channels`), class token removed.

        Args:
            x: Input `(B, C, *size)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Apply the final norm to the last stage's output (the only stage at its width).
            output_fmt: `NCHW` channels-first maps or `NLC` tokens.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The intermediates, or `(final_tokens, intermediates)` as `forward_features`.
        """
        take, last = feature_take_last(len(self.stage_channels), indices, output_fmt, stop_early, intermediates_only)
        x, feat_size = self._embed(x)
        feats = []
        for i in range(last + 1):
            x, feat_size = self._forward_stage(i, x, feat_size)
            if i in take:
                y = self.norm(x) if (norm and i == len(self.stage_channels) - 1) else x
                y = y[:, self.num_prefix_tokens :]
                if output_fmt == "NCHW":
                    y = y.transpose(1, 2).reshape(y.shape[0], -1, *feat_size)
                feats.append(y)
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            self._check_pool(global_pool, self.num_prefix_tokens > 0)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
