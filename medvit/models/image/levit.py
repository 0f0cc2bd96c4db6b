"""LeViT: a hierarchical vision transformer built for fast inference.

Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference",
ICCV 2021.

A stride-16 convolutional stem (four 3x3 stride-2 conv + BN, hardswish between), then
three stages of attention blocks at strides 16/32/64. Position enters through a learned
per-head attention bias on relative offsets instead of a position embedding; stages are
joined by shrinking attention (queries on a subsampled grid); every linear is followed by
BatchNorm instead of a LayerNorm before it; activations are hardswish. The classifier
averages a class head and a distillation head (DeiT-style hard distillation in training).

This is the linear-mode model (tokens `(B, N, C)` inside the stages), with timm's `levit_*`
parameter names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import DropPath, drop_path_schedule
from medvit.layers.attention_bias import AttentionBias, AttentionSubsample
from medvit.layers.helpers import to_ntuple
from medvit.layers.linear_norm import ConvNorm, LinearNorm, NormLinear
from medvit.models._features import feature_take_last
from medvit.registry import register_model


class Stem16(nn.Sequential):
    """Four 3x3 stride-2 `ConvNorm`s widening to `embed_dim` (x1/8, x1/4, x1/2, x1).

    Args:
        in_chans: Input channels.
        embed_dim: Output channels.
        act_layer: Activation between the convolutions.
    """

    def __init__(self, in_chans: int, embed_dim: int, act_layer: Callable[[], nn.Module]) -> None:
        super().__init__()
        widths = [in_chans, embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim]
        for i in range(4):
            self.add_module(f"conv{i + 1}", ConvNorm(widths[i], widths[i + 1], 3, stride=2, padding=1))
            if i < 3:
                self.add_module(f"act{i + 1}", act_layer())


class LevitMlp(nn.Module):
    """`LinearNorm` -> activation -> dropout -> `LinearNorm` (the second BN starts at zero).

    Args:
        in_features: Input width.
        hidden_features: Hidden width.
        act_layer: Activation.
        drop: Dropout after the activation.
    """

    def __init__(
        self, in_features: int, hidden_features: int, act_layer: Callable[[], nn.Module], drop: float = 0.0
    ) -> None:
        super().__init__()
        self.ln1 = LinearNorm(in_features, hidden_features)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.ln2 = LinearNorm(hidden_features, in_features, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.drop(self.act(self.ln1(x))))


class LevitBlock(nn.Module):
    """Residual attention-bias attention, then residual MLP (no norm before either: BN is inside).

    Args:
        dim: Token width.
        key_dim: Query/key width per head.
        num_heads: Heads.
        attn_ratio: Value width per head relative to `key_dim`.
        mlp_ratio: MLP hidden width relative to `dim`.
        resolution: Token grid.
        act_layer: Activation of the attention output and the MLP.
        drop_path: Stochastic-depth probability.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        attn_ratio: float,
        mlp_ratio: float,
        resolution: tuple[int, int],
        act_layer: Callable[[], nn.Module],
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn = AttentionBias(dim, key_dim, num_heads, attn_ratio, resolution, act_layer)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), act_layer)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class LevitDownsample(nn.Module):
    """Shrinking attention (no residual: the grid changes) followed by a residual MLP.

    Args:
        in_dim: Input width.
        out_dim: Output width.
        key_dim: Query/key width per head; the heads are `in_dim // key_dim`.
        resolution: Input token grid.
        act_layer: Activation.
        drop_path: Stochastic-depth probability of the MLP.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        resolution: tuple[int, int],
        act_layer: Callable[[], nn.Module],
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attn_downsample = AttentionSubsample(
            in_dim, out_dim, key_dim, in_dim // key_dim, 4.0, 2, resolution, act_layer
        )
        self.mlp = LevitMlp(out_dim, 2 * out_dim, act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return x + self.drop_path(self.mlp(x))


class LevitStage(nn.Module):
    """Optional shrinking transition, then `depth` LeViT blocks at the new grid.

    Args:
        in_dim: Input width.
        out_dim: Stage width.
        key_dim: Query/key width per head.
        depth: Blocks.
        num_heads: Heads of the blocks.
        attn_ratio: Value width per head relative to `key_dim`.
        mlp_ratio: MLP hidden width relative to `out_dim`.
        resolution: Input token grid.
        downsample: Start with a shrinking attention transition (grid halved, rounding up).
        act_layer: Activation.
        drop_path: Per-block stochastic-depth probabilities (transition uses the first).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        key_dim: int,
        depth: int,
        num_heads: int,
        attn_ratio: float,
        mlp_ratio: float,
        resolution: tuple[int, int],
        downsample: bool,
        act_layer: Callable[[], nn.Module],
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        if downsample:
            self.downsample = LevitDownsample(in_dim, out_dim, key_dim, resolution, act_layer, drop_path[0])
            resolution = tuple((r - 1) // 2 + 1 for r in resolution)
        else:
            if in_dim != out_dim:
                raise ValueError(f"a stage without downsampling keeps its width ({in_dim} != {out_dim})")
            self.downsample = nn.Identity()
        self.resolution = resolution
        self.blocks = nn.Sequential(
            *[
                LevitBlock(out_dim, key_dim, num_heads, attn_ratio, mlp_ratio, resolution, act_layer, dp)
                for dp in drop_path
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Levit(nn.Module):
    """LeViT (linear mode) with its class and distillation heads.

    Args:
        img_size: Input size (an int is repeated); the stem stride 16 must divide it.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` (mean of the last stage's tokens) or `` (`forward` returns tokens).
        embed_dim: Width of each stage.
        key_dim: Query/key width per head (all stages).
        depth: Blocks per stage.
        num_heads: Heads per stage.
        attn_ratio: Value width per head relative to `key_dim`, per stage or for all.
        mlp_ratio: MLP hidden width relative to the stage width, per stage or for all.
        act_layer: Activation (hardswish in the paper).
        distilled: Add the distillation head; the output is the mean of both heads, or
            the pair `(class, distillation)` in training when `distilled_training` is set.
        drop_rate: Dropout before the classifiers.
        drop_path_rate: Stochastic depth of the last block (linear over all blocks).
        freeze_patch_embed: Keep the random convolutional stem fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: Sequence[int] = (192,),
        key_dim: int = 64,
        depth: Sequence[int] = (12,),
        num_heads: Sequence[int] = (3,),
        attn_ratio: float | Sequence[float] = 2.0,
        mlp_ratio: float | Sequence[float] = 2.0,
        act_layer: Callable[[], nn.Module] = nn.Hardswish,
        distilled: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        n = len(embed_dim)
        if not n or len(depth) != n or len(num_heads) != n:
            raise ValueError("embed_dim, depth and num_heads need one entry per stage")
        if global_pool not in ("avg", ""):
            raise ValueError(f"LeViT supports global_pool 'avg' or '', got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if embed_dim[0] % 8 != 0 or any(d % key_dim for d in embed_dim[:-1]):
            raise ValueError(
                f"embed_dim {tuple(embed_dim)}: the first width must be a multiple of 8 (stem)"
                f" and all but the last multiples of key_dim ({key_dim}) (transition heads)"
            )
        self.img_size = to_ntuple(img_size, 2, "img_size")
        stem_stride = 16
        if any(s % stem_stride for s in self.img_size) or min(self.img_size) < stem_stride:
            raise ValueError(f"the stem stride {stem_stride} does not divide the image size {self.img_size}")
        attn_ratio = _float_tuple(attn_ratio, n, "attn_ratio")
        mlp_ratio = _float_tuple(mlp_ratio, n, "mlp_ratio")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.spatial_dims = 2
        self.drop_rate = drop_rate
        self.num_features = embed_dim[-1]
        self.distilled_training = False

        self.stem = Stem16(in_chans, embed_dim[0], act_layer)
        if freeze_patch_embed:
            self.stem.requires_grad_(False)
        resolution = tuple(s // stem_stride for s in self.img_size)
        self.grid_size = resolution
        # a transition's MLP shares the drop rate of the stage's first block
        dpr = drop_path_schedule(drop_path_rate, sum(depth))
        stages, start, in_dim, stride = [], 0, embed_dim[0], stem_stride
        self.stage_strides, self.stage_grids = [], []
        for i in range(n):
            stage = LevitStage(
                in_dim, embed_dim[i], key_dim, depth[i], num_heads[i], attn_ratio[i], mlp_ratio[i],
                resolution, i > 0, act_layer, dpr[start : start + depth[i]],
            )
            stages.append(stage)
            stride *= 2 if i > 0 else 1
            resolution = stage.resolution
            self.stage_strides.append(stride)
            self.stage_grids.append(resolution)
            start += depth[i]
            in_dim = embed_dim[i]
        self.stages = nn.Sequential(*stages)
        self.stage_channels = list(embed_dim)
        self.head = self._new_head(num_classes)
        self.head_dist = self._new_head(num_classes) if distilled else None

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        return NormLinear(self.num_features, num_classes, drop=self.drop_rate)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"input size {tuple(x.shape[2:])} does not match the model's img_size {self.img_size}"
                " (the attention biases are tied to the token grid)"
            )
        return self.stem(x).flatten(2).transpose(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of the last stage, `(B, N, C)`."""
        return self.stages(self._stem(x))

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Average the tokens, then the mean of the class and distillation heads."""
        if self.global_pool == "":
            return x
        x = x.mean(dim=1)
        if pre_logits:
            return x
        if self.head_dist is None:
            return self.head(x)
        y, y_dist = self.head(x), self.head_dist(x)
        if self.distilled_training and self.training:
            return y, y_dist
        return (y + y_dist) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        """Per-stage outputs (strides `stage_strides`, widths `stage_channels`).

        Args:
            x: Input `(B, C, H, W)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Unused: LeViT has no final norm (kept for the common interface).
            output_fmt: `NCHW` (`(B, C, h, w)`) or `NLC` (`(B, h * w, C)`).
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The maps, or `(forward_features output, maps)`.
        """
        take, last = feature_take_last(len(self.stages), indices, output_fmt, stop_early, intermediates_only)
        x = self._stem(x)
        feats = []
        for i, stage in enumerate(self.stages[: last + 1]):
            x = stage(x)
            if i in take:
                h, w = self.stage_grids[i]
                feats.append(x if output_fmt == "NLC" else x.transpose(1, 2).reshape(x.shape[0], -1, h, w))
        if intermediates_only:
            return feats
        return x, feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and the distillation head); 0 removes them."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"LeViT supports global_pool 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._new_head(num_classes)
        if self.head_dist is not None:
            self.head_dist = self._new_head(num_classes)


def _float_tuple(value: float | Sequence[float], n: int, name: str) -> tuple[float, ...]:
    """Repeat a number over `n` stages, or check a per-stage sequence."""
    if isinstance(value, (int, float)):
        return (float(value),) * n
    out = tuple(float(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{name} needs one entry per stage ({n}), got {len(out)}")
    return out


# -- registered variants ---------------------------------------------------------------
# The paper's Table 2 (timm's `model_cfgs`): stage widths, heads and depths; key_dim
# 16 for the 128 models, 32 otherwise.


@register_model
def levit_128s(**kwargs: Any) -> Levit:
    """LeViT-128S: widths (128, 256, 384), heads (4, 6, 8), depths (2, 3, 4), 224 px (Graham et al., 2021)."""
    cfg = dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 6, 8), depth=(2, 3, 4))
    return Levit(**{**cfg, **kwargs})


@register_model
def levit_128(**kwargs: Any) -> Levit:
    """LeViT-128: widths (128, 256, 384), heads (4, 8, 12), depths (4, 4, 4), 224 px (Graham et al., 2021)."""
    cfg = dict(embed_dim=(128, 256, 384), key_dim=16, num_heads=(4, 8, 12), depth=(4, 4, 4))
    return Levit(**{**cfg, **kwargs})


@register_model
def levit_192(**kwargs: Any) -> Levit:
    """LeViT-192: widths (192, 288, 384), heads (3, 5, 6), depths (4, 4, 4), 224 px (Graham et al., 2021)."""
    cfg = dict(embed_dim=(192, 288, 384), key_dim=32, num_heads=(3, 5, 6), depth=(4, 4, 4))
    return Levit(**{**cfg, **kwargs})


@register_model
def levit_256(**kwargs: Any) -> Levit:
    """LeViT-256: widths (256, 384, 512), heads (4, 6, 8), depths (4, 4, 4), 224 px (Graham et al., 2021)."""
    cfg = dict(embed_dim=(256, 384, 512), key_dim=32, num_heads=(4, 6, 8), depth=(4, 4, 4))
    return Levit(**{**cfg, **kwargs})


@register_model
def levit_384(**kwargs: Any) -> Levit:
    """LeViT-384: widths (384, 512, 768), heads (6, 9, 12), depths (4, 4, 4), 224 px (Graham et al., 2021)."""
    cfg = dict(embed_dim=(384, 512, 768), key_dim=32, num_heads=(6, 9, 12), depth=(4, 4, 4))
    return Levit(**{**cfg, **kwargs})
