"""BoTNet: ResNets whose last-stage 3x3 convolutions are global multi-head self-attention.

Srinivas et al., "Bottleneck Transformers for Visual Recognition", CVPR 2021. A BoT block
is a ResNet bottleneck with the 3x3 convolution replaced by all-to-all MHSA with 2D
relative position logits (4 heads); BoT50 does this in the three c5 blocks of ResNet-50,
the first of them downsampling with a 2x2 average pool after the attention. The BoTNet-S1
family keeps c5 at stride 1 (16), adds squeeze-excite and SiLU, and deepens c3/c5.

`AttnResNet` is the shared hybrid ResNet (stem, four bottleneck stages with a middle-layer
factory per stage, the common backbone interface); HaloNet builds on it too. No timm
model has these configurations, so the stem and blocks use torchvision's ResNet names
(`conv1`, `bn1`, ..., `fc`); the attention layers mirror timm's `BottleneckAttn`, so timm
attention weights load into them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers.drop import drop_path_schedule
from medvit.layers.helpers import to_ntuple
from medvit.layers.rel_pos_attention import RelPosSelfAttention2d
from medvit.layers.resnet_stages import MidLayer, ResNetBlock, conv3x3_mid
from medvit.models._features import check_output_fmt, feature_take_indices
from medvit.registry import register_model

POOL_TYPES = ("avg", "")


class AttnResNet(nn.Module):
    """Stem and four bottleneck stages, each stage with its own middle-layer factory.

    Args:
        depths: Blocks per stage.
        channels: Output channels per stage.
        mid_layers: Middle-layer factory per stage.
        stage_strides: Stride of each stage's first block (the stem already gives 4).
        bottle_ratio: Bottleneck width relative to the stage output.
        value_ratio: Middle-layer output width relative to the bottleneck width.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` or `` (no pooling).
        img_size: Input size; attention layers with position tables are built for it.
        stem_chs: Stem width.
        act_layer: Activation of the blocks.
        se_ratio: Squeeze-excite ratio of the blocks (0: none).
        head_hidden_size: Width of a 1x1 conv + BN + act before the pooling (None: none).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth of the last block (linear over all blocks).
        size_multiple: The input size must be a multiple of this (block sizes, pooling).
        freeze_patch_embed: Freeze the stem convolution, this network's patch projection
            (MoCo v3's stabilisation trick).
    """

    def __init__(
        self,
        depths: Sequence[int],
        channels: Sequence[int],
        mid_layers: Sequence[MidLayer],
        stage_strides: Sequence[int] = (1, 2, 2, 2),
        bottle_ratio: float = 0.25,
        value_ratio: float = 1.0,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        img_size: int | Sequence[int] = 224,
        stem_chs: int = 64,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        se_ratio: float = 0.0,
        head_hidden_size: int | None = None,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        size_multiple: int = 32,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if not len(depths) == len(channels) == len(mid_layers) == len(stage_strides):
            raise ValueError("depths, channels, mid_layers and stage_strides must have equal lengths")
        if min(depths) < 1:
            raise ValueError(f"every stage needs at least one block, got depths {tuple(depths)}")
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.img_size = to_ntuple(img_size, 2, "img_size")
        if any(s % size_multiple for s in self.img_size):
            raise ValueError(f"img_size {self.img_size}: {size_multiple} does not divide it")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.spatial_dims = 2
        self.stage_channels = [int(c) for c in channels]
        strides, s = [], 4
        for st in stage_strides:
            s *= st
            strides.append(s)
        self.stage_strides = strides

        self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        stages, prev, k, red = [], stem_chs, 0, 4
        for d, c, mid_layer, st in zip(depths, channels, mid_layers, stage_strides):
            mid = int(round(c * bottle_ratio))
            blocks = []
            for i in range(d):
                stride = st if i == 0 else 1
                feat = (self.img_size[0] // red, self.img_size[1] // red)
                blocks.append(
                    ResNetBlock(
                        prev, c, mid, stride, feat, mid_layer, int(round(mid * value_ratio)),
                        act_layer, se_ratio, dpr[k],
                    )
                )
                prev, k, red = c, k + 1, red * stride
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_conv: nn.Module = nn.Identity()
        if head_hidden_size:
            self.final_conv = nn.Sequential(
                nn.Conv2d(prev, head_hidden_size, 1, bias=False), nn.BatchNorm2d(head_hidden_size), act_layer()
            )
            prev = head_hidden_size
        self.num_features = prev
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()
        if freeze_patch_embed:
            self.conv1.weight.requires_grad_(False)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, ResNetBlock):
                # zero-init the last BN so each residual branch starts as identity
                nn.init.zeros_(m.bn3.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last map (after the optional final conv), `(B, num_features, H/32, W/32)`."""
        return self.final_conv(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the map and classify (or return the pooled vector with `pre_logits`)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

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
        """Per-stage output maps, widths `stage_channels`, strides `stage_strides`.

        Args:
            x: Input `(B, C, H, W)`.
            indices: Stages to return: None = all, n = the last n, or a list (0-based).
            norm: Accepted for the common interface; stage outputs are already normalised.
            output_fmt: `NCHW` or `NLC` (each map flattened to `(B, H' * W', C')`).
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested stage (only with `intermediates_only`).

        Returns:
            The maps, or `(final_map, maps)` with `final_map` as `forward_features` returns it.
        """
        check_output_fmt(output_fmt)
        take = feature_take_indices(len(self.stages), indices)
        last = max(take) + 1 if (stop_early and intermediates_only) else len(self.stages)
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages[:last]):
            x = stage(x)
            if i in take:
                feats.append(x.flatten(2).transpose(1, 2) if output_fmt == "NLC" else x)
        if intermediates_only:
            return feats
        return self.final_conv(x), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")
            self.global_pool = global_pool
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def _mhsa(
    in_chs: int, out_chs: int, stride: int, feat_size: tuple[int, int], num_heads: int, qkv_bias: bool
) -> nn.Module:
    return RelPosSelfAttention2d(in_chs, out_chs, feat_size, stride, num_heads, qkv_bias=qkv_bias)


class BoTNet(AttnResNet):
    """A ResNet whose last stage is made of BoT blocks (MHSA with relative positions).

    Args:
        depths: Blocks per stage (BoT50: 3, 4, 6, 3).
        channels: Output channels per stage.
        num_heads: Heads of the BoT blocks' attention.
        last_stride: Stride of the last stage: 2 (BoT50) or 1 (BoTNet-S1).
        qkv_bias: Bias on the attention projection.
        **kwargs: `AttnResNet` arguments (`img_size`, `num_classes`, `se_ratio`, ...).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (256, 512, 1024, 2048),
        num_heads: int = 4,
        last_stride: int = 2,
        qkv_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        mhsa = partial(_mhsa, num_heads=num_heads, qkv_bias=qkv_bias)
        kwargs.setdefault("size_multiple", 16 * last_stride)
        super().__init__(
            depths, channels, (conv3x3_mid, conv3x3_mid, conv3x3_mid, mhsa), (1, 2, 2, last_stride), **kwargs
        )


@register_model
def botnet50(**kwargs: Any) -> BoTNet:
    """BoT50: ResNet-50 with MHSA in the three c5 blocks, 224 px, 20.8M parameters (Srinivas et al., 2021)."""
    return BoTNet(**kwargs)


# BoTNet-S1 (paper appendix, S1 table): c5 stride 1, SE (width = bottleneck width, i.e. ResNet-RS's
# se_ratio 0.25 of the block output) + SiLU; blocks [3,4,6,6] / [3,4,23,12]; sizes 224 / 256 from memory
@register_model
def botnet_s1_59(**kwargs: Any) -> BoTNet:
    """BoTNet-S1-59: c5 at stride 1, SE and SiLU, blocks (3, 4, 6, 6), 224 px (Srinivas et al., 2021)."""
    cfg = dict(depths=(3, 4, 6, 6), last_stride=1, se_ratio=1.0, act_layer=nn.SiLU, img_size=224)
    return BoTNet(**{**cfg, **kwargs})


@register_model
def botnet_s1_128(**kwargs: Any) -> BoTNet:
    """BoTNet-S1-128: c5 at stride 1, SE and SiLU, blocks (3, 4, 23, 12), 256 px (Srinivas et al., 2021)."""
    cfg = dict(depths=(3, 4, 23, 12), last_stride=1, se_ratio=1.0, act_layer=nn.SiLU, img_size=256)
    return BoTNet(**{**cfg, **kwargs})
