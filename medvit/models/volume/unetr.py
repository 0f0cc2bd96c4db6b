"""UNETR: a transformer encoder with a convolutional U-shaped decoder.

Hatamizadeh et al., "UNETR: Transformers for 3D Medical Image Segmentation", WACV 2022.

The encoder comes from the registry and is read through `forward_intermediates`, so any
registered encoder plugs into the same decoder:

- Single-scale encoders (plain ViT): the paper's decoder. Layer indices are 0-based block
  indices as MONAI's UNETR uses them (its skips are the outputs of blocks 3, 6 and 9 and
  the normed output of the last block), so MONAI checkpoints load unchanged.
- Hierarchical encoders (attributes `stage_channels` and `stage_strides`: Swin, PVT v2,
  MiT): every stage map is a skip at its own stride and the last stage is the bottleneck,
  as in Swin-UNETR. The levels finer than the first stage get their skips from the
  input: a conv block at full resolution (the stem, as in UNETR) and, per missing stride-2
  level, a 2 x 2 patch projection followed by a residual conv block. That is what
  Swin-UNETR does at stride 2 (its patch-2 embedding feeds a conv block), and it gives the
  decoder the image detail a stride-4 encoder never sees; a transposed-conv projection of
  the stride-4 map would only resample what the stride-4 skip already carries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import ConvBlock, ProjectionUpsample, UpBlock
from medvit.layers.conv_blocks import PointwiseConv
from medvit.layers.helpers import check_spatial_dims, conv_nd, to_ntuple
from medvit.registry import create_model, register_model, variant_accepts


def is_hierarchical(encoder: nn.Module) -> bool:
    """Whether the encoder exposes per-stage maps (`stage_channels`, `stage_strides`)."""
    return hasattr(encoder, "stage_channels") and hasattr(encoder, "stage_strides")


def _takes_class_token(name: str) -> bool:
    """Whether a registered variant's class accepts `class_token` (single-scale ViTs do)."""
    return variant_accepts(name, "class_token")


def deep_supervision_heads(spatial_dims: int, widths: Sequence[int], num_classes: int) -> nn.ModuleList:
    """1x1 heads on the decoder levels between full resolution and the coarsest, finest first.

    nnU-Net (Isensee et al. 2021) supervises every decoder output but the coarsest one;
    level `i` (stride `2**i`) has `widths[i]` channels, level 0 is the main head's.

    Raises:
        ValueError: The decoder has fewer than 3 levels (no level between the two).
    """
    if len(widths) < 3:
        raise ValueError(f"deep_supervision needs a decoder of 3 or more levels, this one has {len(widths)}")
    return nn.ModuleList(PointwiseConv(spatial_dims, widths[i], num_classes) for i in range(1, len(widths) - 1))


def run_decoder(
    ups: nn.ModuleList, y: torch.Tensor, skips: Sequence[torch.Tensor], aux_heads: nn.ModuleList | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Upsample `y` through `ups` (coarsest first), fusing `skips` (finest first).

    Returns:
        The full-resolution features and, with `aux_heads` (from `deep_supervision_heads`),
        their logits at levels 1, 2, ... (finest first); else an empty list.
    """
    aux: list[torch.Tensor] = []
    for k, (up, skip) in enumerate(zip(ups, reversed(skips))):
        y = up(y, skip)
        level = len(ups) - 1 - k
        if aux_heads is not None and 1 <= level <= len(aux_heads):
            aux.append(aux_heads[level - 1](y).contiguous())
    return y, aux[::-1]


def _build_encoder(
    name: str, in_chans: int, img_size: tuple[int, ...], encoder_args: dict[str, Any] | None, *, spatial_dims: int
) -> nn.Module:
    """Build a registered encoder for the decoder: features only, input geometry passed on.

    Encoders whose class takes `class_token` (single-scale ViTs, MViT) get `class_token=False`
    unless `encoder_args` sets it; the others (Swin, PVT v2, MiT, ...) never receive it.
    """
    args: dict[str, Any] = dict(global_pool="", num_classes=0)
    args.update(encoder_args or {})
    args.update(img_size=img_size, in_chans=in_chans, spatial_dims=spatial_dims)
    if "class_token" not in args and _takes_class_token(name):
        args["class_token"] = False
    return create_model(name, **args)


def _log2(value: int, what: str) -> int:
    if value < 1 or not math.log2(value).is_integer():
        raise ValueError(f"UNETR needs power-of-two {what}, got {value}")
    return int(math.log2(value))


class UNETR(nn.Module):
    """UNETR segmentation network on a single-scale or hierarchical encoder.

    Args:
        encoder: Registered encoder name, or a built encoder module.
        in_chans: Input channels.
        num_classes: Output channels (classes, background included).
        img_size: Input (window) size; an int is repeated.
        feature_size: Width of the full-resolution decoder stage (doubles per stage).
        spatial_dims: 3 for volumes, 2 for slices.
        skip_indices: Single-scale encoders: blocks whose outputs feed the skips, shallow to
            deep, one per decoder stage between the stem and the bottleneck (log2(patch) - 1
            of them); default: evenly spaced, blocks 3/6/9 of a 12-block ViT-*/16 as in the
            paper. Hierarchical encoders use every stage and take none.
        norm: Decoder norm, `instance` or `batch`.
        res_block: Residual decoder conv blocks.
        conv_block: Conv blocks in the skip upsampling paths (single-scale encoders).
        encoder_args: Extra arguments for the encoder (ignored for a built module).
        deep_supervision: Add 1x1 heads on the decoder levels between full resolution and
            the coarsest (nnU-Net's deep supervision); in training mode `forward` then
            returns `[logits, aux_level1, aux_level2, ...]`, finest first. In eval mode the
            output is the full-resolution logits as without it.

    Attributes:
        hierarchical: Whether the encoder's stage maps feed the decoder.
        stride: Total downsampling; inputs must be multiples of it.
        aux_heads: The deep supervision heads (level 1 first), or None.
    """

    def __init__(
        self,
        encoder: str | nn.Module = "vit_base_patch16_96_3d",
        in_chans: int = 1,
        num_classes: int = 14,
        img_size: int | Sequence[int] = 96,
        feature_size: int = 16,
        spatial_dims: int = 3,
        skip_indices: Sequence[int] | None = None,
        norm: str = "instance",
        res_block: bool = True,
        conv_block: bool = True,
        encoder_args: dict[str, Any] | None = None,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if feature_size < 1:
            raise ValueError(f"feature_size must be >= 1, got {feature_size}")
        self.spatial_dims = spatial_dims
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.in_chans = in_chans
        self.num_classes = num_classes
        if isinstance(encoder, str):
            encoder = _build_encoder(encoder, in_chans, self.img_size, encoder_args, spatial_dims=spatial_dims)
        self.encoder = encoder
        self.hierarchical = is_hierarchical(encoder)
        kw = dict(norm=norm, residual=res_block)
        self.stem = ConvBlock(spatial_dims, in_chans, feature_size, **kw)
        if self.hierarchical:
            if skip_indices is not None:
                raise ValueError("skip_indices selects ViT blocks; a hierarchical encoder feeds every stage")
            num_up = self._build_hierarchical(feature_size, kw)
        else:
            num_up = self._build_single_scale(feature_size, skip_indices, conv_block, kw)
        self.stride = 2**num_up
        if any(s % self.stride for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} is not a multiple of the total stride {self.stride}")
        self.head = PointwiseConv(spatial_dims, feature_size, num_classes)
        widths = [feature_size * 2**i for i in range(num_up)]
        self.aux_heads = deep_supervision_heads(spatial_dims, widths, num_classes) if deep_supervision else None
        # oneDNN's channels-last convolutions are ~2x faster on CPUs; the decoder runs in it
        self.memory_format = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
        if spatial_dims > 1:
            for part in (self.stem, self.down, self.skips, self.ups):
                part.to(memory_format=self.memory_format)

    def _build_single_scale(
        self, feature_size: int, skip_indices: Sequence[int] | None, conv_block: bool, kw: dict[str, Any]
    ) -> int:
        """The paper's decoder: token maps upsampled to their level by transposed convs."""
        patch = tuple(getattr(self.encoder, "patch_size", ()))
        if len(set(patch)) != 1:
            raise ValueError(
                "UNETR needs a hierarchical encoder (stage_channels, stage_strides) or one with an"
                f" isotropic patch_size, got patch_size {patch}"
            )
        num_up = _log2(patch[0], "patch size")
        if skip_indices is None:
            depth = len(getattr(self.encoder, "blocks", ()))
            if depth < num_up:
                raise ValueError("pass skip_indices: the encoder's block count is unknown or too small")
            skip_indices = [depth * k // num_up for k in range(1, num_up)]
        self.skip_indices = tuple(skip_indices)
        if len(self.skip_indices) != num_up - 1:
            raise ValueError(
                f"patch size {patch[0]} needs {num_up - 1} skip indices, got {self.skip_indices}"
            )
        hidden = self.encoder.num_features
        widths = [feature_size * 2**i for i in range(num_up)]
        self.down = nn.ModuleList()
        self.skips = nn.ModuleList(
            ProjectionUpsample(self.spatial_dims, hidden, widths[i], num_up - i, conv_block=conv_block, **kw)
            for i in range(1, num_up)
        )
        self.ups = nn.ModuleList(
            UpBlock(self.spatial_dims, hidden if i == num_up - 1 else widths[i + 1], widths[i], **kw)
            for i in reversed(range(num_up))
        )
        return num_up

    def _build_hierarchical(self, feature_size: int, kw: dict[str, Any]) -> int:
        """Stage maps as skips at their strides, input-side skips below the first stage."""
        channels = list(self.encoder.stage_channels)
        levels = [_log2(s, "stage strides") for s in self.encoder.stage_strides]
        if not channels or len(channels) != len(levels):
            raise ValueError(f"stage_channels {channels} and stage_strides do not match")
        if levels[0] < 1 or any(b != a + 1 for a, b in zip(levels, levels[1:])):
            raise ValueError(
                f"UNETR needs stage strides doubling from 2 or more, got {self.encoder.stage_strides}"
            )
        num_up = levels[-1]
        widths = [feature_size * 2**i for i in range(num_up)]
        conv = conv_nd(self.spatial_dims)
        self.skip_indices = tuple(range(len(channels)))
        self.down = nn.ModuleList(
            nn.Sequential(
                conv(self.in_chans if i == 1 else widths[i - 1], widths[i], 2, stride=2, bias=False),
                ConvBlock(self.spatial_dims, widths[i], widths[i], **kw),
            )
            for i in range(1, levels[0])
        )
        self.skips = nn.ModuleList(
            ConvBlock(self.spatial_dims, c, widths[lv], **kw) for c, lv in zip(channels[:-1], levels)
        )
        self.ups = nn.ModuleList(
            UpBlock(self.spatial_dims, channels[-1] if i == num_up - 1 else widths[i + 1], widths[i], **kw)
            for i in reversed(range(num_up))
        )
        return num_up

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"expected input (batch, {self.in_chans} channels, {self.spatial_dims} spatial dims),"
                f" got shape {tuple(x.shape)}"
            )
        if any(s % self.stride for s in x.shape[2:]):
            raise ValueError(
                f"input spatial size {tuple(x.shape[2:])} is not a multiple of the model's total"
                f" stride {self.stride}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        fmt = self.memory_format if self.spatial_dims > 1 else torch.contiguous_format
        if self.hierarchical:
            y, skips = self._hierarchical_skips(x, fmt)
        else:
            y, skips = self._single_scale_skips(x, fmt)
        deep = self.aux_heads is not None and self.training
        y, aux = run_decoder(self.ups, y, skips, self.aux_heads if deep else None)
        out = self.head(y).contiguous()
        return [out, *aux] if deep else out

    def _single_scale_skips(
        self, x: torch.Tensor, fmt: torch.memory_format
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        final, feats = self.encoder.forward_intermediates(x, self.skip_indices, output_fmt="NLC")
        grid = self.encoder.grid_size if x.shape[2:] == self.img_size else None
        if grid is None:
            grid = self.encoder.patch_embed.dynamic_grid(x.shape[2:])

        def to_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid).contiguous(memory_format=fmt)

        prefix = getattr(self.encoder, "num_prefix_tokens", 0)
        stem = self.stem(x.contiguous(memory_format=fmt))
        skips = [stem] + [path(to_map(f)) for path, f in zip(self.skips, feats)]
        return to_map(final[:, prefix:]), skips

    def _hierarchical_skips(
        self, x: torch.Tensor, fmt: torch.memory_format
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = self.encoder.forward_intermediates(
            x, self.skip_indices, norm=True, output_fmt="NCHW", intermediates_only=True
        )
        y = x.contiguous(memory_format=fmt)
        skips = [self.stem(y)]
        for down in self.down:
            y = down(y)
            skips.append(y)
        skips += [path(f.contiguous(memory_format=fmt)) for path, f in zip(self.skips, feats)]
        return feats[-1].contiguous(memory_format=fmt), skips


# MONAI's UNETR encoder: no q/k/v bias, LayerNorm eps 1e-5 (so its checkpoints load); feature
# size 16 and skips from blocks 3/6/9 as the paper
_MONAI_VIT = dict(feature_size=16, skip_indices=(3, 6, 9), encoder_args=dict(qkv_bias=False, norm_eps=1e-5))
# hierarchical encoders: feature size 16 as the paper's UNETR, so that the same decoder widths
# isolate the encoder and the full-resolution convs (the decoder's CPU cost) stay at half of 24's
_HIERARCHICAL = dict(feature_size=16)
# what belongs to the variant's own encoder; a user's encoder gets none of it
_ENCODER_DEFAULTS = ("encoder", "skip_indices", "encoder_args")


def _create_unetr(cfg: dict[str, Any], kwargs: dict[str, Any]) -> UNETR:
    """The variant's `cfg` under the caller's `kwargs`; `encoder_args` merge key by key.

    With another encoder than the variant's, only the decoder defaults of `cfg` apply.
    """
    if kwargs.get("encoder", cfg["encoder"]) != cfg["encoder"]:
        cfg = {k: v for k, v in cfg.items() if k not in _ENCODER_DEFAULTS}
    args = {**cfg, **kwargs}
    if "encoder_args" in cfg:
        args["encoder_args"] = {**cfg["encoder_args"], **(kwargs.get("encoder_args") or {})}
    return UNETR(**args)


@register_model
def unetr_base(**kwargs: Any) -> UNETR:
    """The paper's UNETR: ViT-B/16 on 96^3 crops, feature size 16, skips from blocks 3/6/9."""
    return _create_unetr(dict(_MONAI_VIT, encoder="vit_base_patch16_96_3d"), kwargs)


@register_model
def unetr_small(**kwargs: Any) -> UNETR:
    """UNETR on ViT-S/16 (384 wide, 12 blocks, 6 heads), feature size 16."""
    return _create_unetr(dict(_MONAI_VIT, encoder="vit_small_patch16_96_3d"), kwargs)


@register_model
def unetr_tiny(**kwargs: Any) -> UNETR:
    """UNETR on ViT-Ti/16 (192 wide, 12 blocks, 3 heads), feature size 16: trains on a CPU."""
    return _create_unetr(dict(_MONAI_VIT, encoder="vit_tiny_patch16_96_3d"), kwargs)


@register_model
def unetr_swin_tiny(**kwargs: Any) -> UNETR:
    """UNETR decoder on the 3D Swin-T encoder (patch 4, window 7), 96^3 crops, feature size 16."""
    return _create_unetr(dict(_HIERARCHICAL, encoder="swin_tiny_patch4_window7_3d"), kwargs)


@register_model
def unetr_pvt_v2_b1(**kwargs: Any) -> UNETR:
    """UNETR decoder on a 3D PVT v2-b1 encoder, 96^3 crops, feature size 16."""
    return _create_unetr(dict(_HIERARCHICAL, encoder="pvt_v2_b1"), kwargs)


@register_model
def unetr_mit_b0(**kwargs: Any) -> UNETR:
    """UNETR decoder on a 3D MiT-b0 (SegFormer) encoder, 96^3 crops, feature size 16."""
    return _create_unetr(dict(_HIERARCHICAL, encoder="mit_b0"), kwargs)
