"""Swin-UNETR: a 3D Swin Transformer encoder with a residual convolutional U-shaped decoder.

Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
Tumors in MRI Images", BrainLes (MICCAI workshop) 2021.

The encoder is medvit's `SwinTransformer` (`spatial_dims` 2 or 3) in the layout of the
reference code (MONAI's `SwinUNETR`): patch size 2, a patch merging after the last stage
too, and skips taken after every merge (the patch embedding output first), each normalised
by a parameter-free layer norm. Where a stage's grid is no larger than the window, the
window shrinks to the grid and keeps the configured window's bias table, indexed as MONAI
does, so MONAI checkpoints load exactly (`medvit.convert.load_monai`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers import ConvBlock, UpBlock
from medvit.layers.conv_blocks import PointwiseConv
from medvit.layers.helpers import to_ntuple
from medvit.models.image.swin import SwinTransformer
from medvit.models.volume.unetr import deep_supervision_heads, run_decoder
from medvit.registry import register_model

PATCH_SIZE = 2


class SwinUNETR(nn.Module):
    """Swin-UNETR segmentation network.

    Args:
        in_chans: Input channels.
        num_classes: Output channels (classes, background included).
        img_size: Input (window) size; an int is repeated. Windows larger than a stage's
            grid at this size shrink to it (decided here, for every input size, where MONAI
            decides per input: other sizes give the same results as MONAI only where no
            window shrinks at either size).
        feature_size: Width of the patch embedding and of the full-resolution decoder
            stage; it doubles per stage.
        spatial_dims: 3 for volumes, 2 for slices.
        depth: Swin blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Attention window (an int is repeated).
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: Bias of the q/k/v projections.
        drop_rate: Dropout after the encoder's projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the encoder, rising linearly over its blocks.
        normalize: Layer-normalise (without parameters) every encoder map the decoder reads.
        norm: Decoder norm, `instance` or `batch`.
        res_block: Residual decoder conv blocks.
        deep_supervision: Add 1x1 heads on the decoder levels between full resolution and
            the coarsest (nnU-Net's deep supervision); in training mode `forward` then
            returns `[logits, aux_level1, aux_level2, ...]`, finest first. In eval mode the
            output is the full-resolution logits as without it.

    Attributes:
        aux_heads: The deep supervision heads (level 1 first), or None.
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 14,
        img_size: int | Sequence[int] = 96,
        feature_size: int = 48,
        spatial_dims: int = 3,
        depth: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        normalize: bool = True,
        norm: str = "instance",
        res_block: bool = True,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.normalize = normalize
        num_stages = len(tuple(depth))
        # the patch embedding halves the input, every stage (the last included) halves again
        self.stride = PATCH_SIZE * 2**num_stages
        if any(s % self.stride for s in self.img_size):
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of the total stride {self.stride} "
                f"(patch {PATCH_SIZE} x 2^{num_stages} merges)"
            )
        self.encoder = SwinTransformer(
            img_size=self.img_size,
            patch_size=PATCH_SIZE,
            in_chans=in_chans,
            num_classes=0,
            global_pool="",
            embed_dim=feature_size,
            depth=depth,
            num_heads=num_heads,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            patch_norm=False,
            spatial_dims=spatial_dims,
            final_merge=True,
            final_norm=False,
            bias_table="full",
            intermediate_taps="merged",
        )
        # encoder maps: patch embedding (stride 2), every merge (4, ..., the last at `stride`)
        channels = self.encoder.stage_channels
        kw: dict[str, Any] = dict(norm=norm, residual=res_block)
        self.stem = ConvBlock(spatial_dims, in_chans, feature_size, **kw)
        self.skips = nn.ModuleList(ConvBlock(spatial_dims, c, c, **kw) for c in channels[:-2])
        self.bottleneck = ConvBlock(spatial_dims, channels[-1], channels[-1], **kw)
        widths = [feature_size] + list(channels)
        self.ups = nn.ModuleList(
            UpBlock(spatial_dims, widths[i + 1], widths[i], **kw) for i in reversed(range(len(widths) - 1))
        )
        self.head = PointwiseConv(spatial_dims, feature_size, num_classes)
        # decoder level i (stride 2**i) is widths[i] wide; the last width is the bottleneck's
        self.aux_heads = deep_supervision_heads(spatial_dims, widths[:-1], num_classes) if deep_supervision else None
        # oneDNN's channels-last convolutions are ~2x faster on CPUs; the decoder runs in it
        self.memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        for part in (self.stem, self.skips, self.bottleneck, self.ups):
            part.to(memory_format=self.memory_format)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (batch, {self.in_chans}, {self.spatial_dims} spatial dims), got {tuple(x.shape)}"
            )
        if any(s % self.stride for s in x.shape[2:]):
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} is not a multiple of the model's total stride {self.stride}"
            )

    def encoder_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder maps the decoder reads, `(B, C, *grid)` in channels-last memory, fine to coarse."""
        feats = self.encoder.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        maps = []
        for tokens, stride in zip(feats, self.encoder.stage_strides):
            if self.normalize:
                tokens = F.layer_norm(tokens, tokens.shape[-1:])
            grid = [s // stride for s in x.shape[2:]]
            # (B, L, C) tokens are the channels-last layout of the map: a view, no copy
            maps.append(tokens.reshape(x.shape[0], *grid, tokens.shape[-1]).movedim(-1, 1))
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        maps = self.encoder_maps(x)
        skips = [self.stem(x.contiguous(memory_format=self.memory_format))]
        skips += [block(m) for block, m in zip(self.skips, maps)]
        # the last merged input is a skip as it is; the final merge feeds the bottleneck
        skips.append(maps[-2])
        y = self.bottleneck(maps[-1])
        deep = self.aux_heads is not None and self.training
        y, aux = run_decoder(self.ups, y, skips, self.aux_heads if deep else None)
        out = self.head(y).contiguous()
        return [out, *aux] if deep else out


@register_model
def swin_unetr_base(**kwargs: Any) -> SwinUNETR:
    """The paper's Swin-UNETR: feature size 48, depths 2/2/2/2, heads 3/6/12/24, window 7, 96^3."""
    return SwinUNETR(**{**dict(feature_size=48), **kwargs})


@register_model
def swin_unetr_small(**kwargs: Any) -> SwinUNETR:
    """Swin-UNETR at feature size 24 (MONAI's default width), otherwise the paper's configuration."""
    return SwinUNETR(**{**dict(feature_size=24), **kwargs})
