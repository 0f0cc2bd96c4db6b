"""ResNet with GroupNorm and weight-standardised convolutions: the ViT hybrids' CNN.

Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning",
ECCV 2020: ResNets whose BatchNorm is replaced by GroupNorm + Weight Standardization.
The ViT paper's hybrid (Dosovitskiy et al., 2021, Section 3.1) feeds the feature map of
such a ResNet-50 to the transformer; it uses the standard (post-activation) bottleneck,
TensorFlow "SAME" padding and, for the stride-16 models, three stages of 3, 4 and 9
blocks. That form is what is implemented here, in 2D and (`spatial_dims=3`) 3D; TransUNet
reuses it as its encoder CNN, taking the skip features from `forward_intermediates`.

Parameter names follow timm's `ResNetV2` (with `preact=False`), so the hybrid
checkpoints load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from medvit.layers import DropPath, drop_path_schedule
from medvit.layers.helpers import to_ntuple
from medvit.layers.std_conv import MaxPoolSame, std_conv_nd
from medvit.models._features import check_output_fmt, feature_take_indices

POOL_TYPES = ("avg", "")


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES} for ResNetV2, got {global_pool!r}")
    return global_pool


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, each standardised conv + GroupNorm; ReLU after the sum.

    Args:
        spatial_dims: 2 or 3.
        in_chs: Input channels.
        out_chs: Output channels (4x the bottleneck width).
        stride: Stride of the 3x3 convolution (and of the projection shortcut).
        num_groups: GroupNorm groups.
        conv_eps: Weight-standardisation epsilon.
        drop_path: Stochastic-depth probability of the residual branch.
        downsample: Project the shortcut with a strided 1x1 conv + GroupNorm (the first
            block of a stage).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        num_groups: int = 32,
        conv_eps: float = 1e-8,
        drop_path: float = 0.0,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        mid_chs = out_chs // 4
        conv = std_conv_nd(spatial_dims)
        self.downsample = (
            nn.Sequential(
                OrderedDict(
                    conv=conv(in_chs, out_chs, 1, stride=stride, padding="same", eps=conv_eps),
                    norm=nn.GroupNorm(num_groups, out_chs),
                )
            )
            if downsample
            else None
        )
        self.conv1 = conv(in_chs, mid_chs, 1, padding="same", eps=conv_eps)
        self.norm1 = nn.GroupNorm(num_groups, mid_chs)
        self.conv2 = conv(mid_chs, mid_chs, 3, stride=stride, padding="same", eps=conv_eps)
        self.norm2 = nn.GroupNorm(num_groups, mid_chs)
        self.conv3 = conv(mid_chs, out_chs, 1, padding="same", eps=conv_eps)
        self.norm3 = nn.GroupNorm(num_groups, out_chs)
        self.act = nn.ReLU()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x) if self.downsample is not None else x
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return self.act(self.drop_path(x) + shortcut)


class ResNetStage(nn.Module):
    """A stage of bottlenecks; the first changes width and stride."""

    def __init__(
        self,
        spatial_dims: int,
        in_chs: int,
        out_chs: int,
        depth: int,
        stride: int,
        num_groups: int,
        conv_eps: float,
        drop_path: Sequence[float],
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                Bottleneck(
                    spatial_dims,
                    in_chs if i == 0 else out_chs,
                    out_chs,
                    stride=stride if i == 0 else 1,
                    num_groups=num_groups,
                    conv_eps=conv_eps,
                    drop_path=drop_path[i],
                    downsample=i == 0,
                )
                for i in range(depth)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """Stem (7x7/2 conv, GroupNorm, ReLU, 3x3/2 max pool) and bottleneck stages.

    The first stage keeps the stem's stride 4, each later one halves the map, so with
    `n` stages the last map has stride `4 * 2 ** (n - 1)` (16 for the hybrid's three).

    Args:
        depths: Bottleneck blocks per stage (ResNet-50: 3, 4, 6, 3; the hybrid: 3, 4, 9).
        channels: Output channels per stage.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` or `` (no pooling: `forward` returns the last map).
        img_size: The training resolution, describing the model (the network accepts
            any size).
        stem_chs: Stem width.
        num_groups: GroupNorm groups of every norm.
        conv_eps: Weight-standardisation epsilon (1e-8 as BiT and the ViT hybrids).
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth of the last block (linear over all blocks).
        spatial_dims: 2 for images, 3 for volumes (3D kernels of the same extents).
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 6, 3),
        channels: Sequence[int] = (256, 512, 1024, 2048),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        img_size: int | Sequence[int] = 224,
        stem_chs: int = 64,
        num_groups: int = 32,
        conv_eps: float = 1e-8,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        _check_pool(global_pool)
        if spatial_dims not in (2, 3):
            raise ValueError(f"ResNetV2 is 2D or 3D, got spatial_dims={spatial_dims}")
        depths, channels = tuple(depths), tuple(channels)
        if not depths or len(depths) != len(channels):
            raise ValueError(f"depths {depths} and channels {channels} must be non-empty and of equal length")
        if min(depths) < 1:
            raise ValueError(f"every stage needs at least one block, got depths {depths}")
        widths = (stem_chs, *channels, *(c // 4 for c in channels))
        if any(c % 4 for c in channels) or any(c % num_groups or c < num_groups for c in widths):
            raise ValueError(
                f"stem_chs {stem_chs}, channels {channels} and their bottleneck widths (channels / 4) "
                f"must be positive multiples of num_groups ({num_groups})"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = channels[-1]
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.img_size = to_ntuple(img_size, spatial_dims, "img_size")
        self.feature_channels = (stem_chs, *channels)
        self.feature_reductions = (2, *(4 * 2**i for i in range(len(channels))))
        self.reduction = self.feature_reductions[-1]

        self.stem = nn.Sequential(
            OrderedDict(
                conv=std_conv_nd(spatial_dims)(in_chans, stem_chs, 7, stride=2, padding="same", eps=conv_eps),
                norm=nn.GroupNorm(num_groups, stem_chs),
                act=nn.ReLU(),
                pool=MaxPoolSame(spatial_dims, 3, stride=2),
            )
        )
        dpr = drop_path_schedule(drop_path_rate, sum(depths))
        stages, prev, start = [], stem_chs, 0
        for i, (d, c) in enumerate(zip(depths, channels)):
            stages.append(
                ResNetStage(
                    spatial_dims, prev, c, d, 1 if i == 0 else 2, num_groups, conv_eps, dpr[start : start + d]
                )
            )
            prev, start = c, start + d
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map, `(B, channels[-1], *spatial / reduction)`."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the map and classify (or return the pooled vector with `pre_logits`)."""
        if self.global_pool == "avg":
            x = x.flatten(2).mean(-1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

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
        """Per-stage maps: index 0 is the stem at stride 2 (before its max pool), index
        `i >= 1` the output of stage `i`; strides and widths are `feature_reductions` and
        `feature_channels`. This is the skip pyramid a U-shaped decoder (TransUNet) uses.

        Args:
            x: Input `(B, C, *spatial)`.
            indices: Features to return: None = all, n = the last n, or a list (0-based).
            norm: Accepted for the common interface; this ResNet has no final norm.
            output_fmt: `NCHW` (channels-first maps, also in 3D) or `NLC` (each map
                flattened to `(B, positions, C')`).
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested feature (only with `intermediates_only`).

        Returns:
            The intermediates, or `(final_map, intermediates)` where `final_map` is what
            `forward_features` returns.
        """
        check_output_fmt(output_fmt)
        take = feature_take_indices(len(self.stages) + 1, indices)
        last = max(take) if (stop_early and intermediates_only) else len(self.stages)

        def out(y: torch.Tensor) -> torch.Tensor:
            return y.flatten(2).transpose(1, 2) if output_fmt == "NLC" else y

        stem = self.stem
        x = stem.act(stem.norm(stem.conv(x)))
        feats = [out(x)] if 0 in take else []
        x = stem.pool(x)
        for i, stage in enumerate(self.stages[:last], start=1):
            x = stage(x)
            if i in take:
                feats.append(out(x))
        if intermediates_only:
            return feats
        return x, feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
