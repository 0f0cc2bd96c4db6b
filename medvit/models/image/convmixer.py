"""ConvMixer: a patch embedding followed by depthwise (spatial) and pointwise (channel) convolutions.

Trockman and Kolter, "Patches Are All You Need?", TMLR 2023.

The network is isotropic: every block keeps the patch grid and the width, so the
per-block feature maps of `forward_intermediates` all have the same shape. Every
convolution is followed by the activation and then BatchNorm, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import grid_for
from medvit.layers.helpers import to_ntuple
from medvit.models._features import collect_intermediates, feature_take_last
from medvit.registry import register_model

POOL_TYPES = ("avg", "")


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES} for ConvMixer, got {global_pool!r}")
    return global_pool


class ConvMixerStem(nn.Module):
    """Patch embedding: a patch-sized, patch-strided convolution, activation, BatchNorm."""

    def __init__(
        self, in_chans: int, embed_dim: int, patch_size: tuple[int, int], act_layer: Callable[[], nn.Module]
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.act = act_layer()
        self.norm = nn.BatchNorm2d(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.proj(x)))


class ConvMixerBlock(nn.Module):
    """x + BN(act(depthwise conv(x))), then BN(act(pointwise conv)): spatial, then channel mixing.

    Args:
        dim: Width.
        kernel_size: Depthwise kernel extent (large: 7 or 9 in the paper).
        act_layer: Activation class.
    """

    def __init__(self, dim: int, kernel_size: int, act_layer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same")
        self.act = act_layer()
        self.norm_dw = nn.BatchNorm2d(dim)
        self.conv_pw = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm_pw = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm_dw(self.act(self.conv_dw(x)))
        return self.norm_pw(self.act(self.conv_pw(x)))


class ConvMixer(nn.Module):
    """ConvMixer-h/d: patch stem, d blocks of width h, global average pooling, a classifier.

    Args:
        embed_dim: Width h of every block.
        depth: Number of blocks d.
        kernel_size: Depthwise kernel extent.
        patch_size: Patch extent (stem kernel and stride).
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` or `` (no pooling: `forward` returns the last map).
        img_size: The training resolution, used to check the patch size and to describe
            the model; the network is convolutional and accepts other sizes (the patch
            grid is the floor of size / patch, as for any strided convolution).
        drop_rate: Dropout before the classifier.
        act_layer: Activation (GELU; ReLU for ConvMixer-768/32).
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).
    """

    def __init__(
        self,
        embed_dim: int = 768,
        depth: int = 32,
        kernel_size: int = 9,
        patch_size: int = 7,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        img_size: int | Sequence[int] = 224,
        drop_rate: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        _check_pool(global_pool)
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("kernel_size", kernel_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.spatial_dims = 2
        self.in_chans = in_chans
        self.img_size = to_ntuple(img_size, 2, "img_size")
        self.patch_size = to_ntuple(patch_size, 2, "patch_size")
        self.grid_size = grid_for(self.img_size, self.patch_size)

        self.stem = ConvMixerStem(in_chans, embed_dim, self.patch_size, act_layer)
        if freeze_patch_embed:
            self.stem.proj.requires_grad_(False)
        self.blocks = nn.Sequential(
            *[ConvMixerBlock(embed_dim, kernel_size, act_layer) for _ in range(depth)]
        )
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's map, `(B, D, H / p, W / p)`."""
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the map and classify (or return the pooled vector with `pre_logits`)."""
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
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
        """Outputs of selected blocks: `(B, D, H / p, W / p)` maps, or `(B, N, D)` tokens.

        Arguments and return value as the common interface (`medvit.models._features`),
        except that `final` is the final map.

        Args:
            x: Input `(B, C, H, W)`.
            norm: Accepted for the common interface; ConvMixer has no final norm.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        x, feats = collect_intermediates(
            self.blocks,
            self.stem(x),
            take,
            last,
            lambda y: y.flatten(2).transpose(1, 2) if output_fmt == "NLC" else y,
        )
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
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# -- registered variants ---------------------------------------------------------------
# ConvMixer-h/d of the paper's ImageNet table (timm's names); 768/32 is the ReLU model.


@register_model
def convmixer_768_32(**kwargs: Any) -> ConvMixer:
    """ConvMixer-768/32, kernel 7, patch 7, ReLU (Trockman and Kolter, 2023)."""
    cfg = dict(embed_dim=768, depth=32, kernel_size=7, patch_size=7, act_layer=nn.ReLU)
    return ConvMixer(**{**cfg, **kwargs})


@register_model
def convmixer_1024_20_ks9_p14(**kwargs: Any) -> ConvMixer:
    """ConvMixer-1024/20, kernel 9, patch 14 (Trockman and Kolter, 2023)."""
    return ConvMixer(**{**dict(embed_dim=1024, depth=20, kernel_size=9, patch_size=14), **kwargs})


@register_model
def convmixer_1536_20(**kwargs: Any) -> ConvMixer:
    """ConvMixer-1536/20, kernel 9, patch 7 (Trockman and Kolter, 2023)."""
    return ConvMixer(**{**dict(embed_dim=1536, depth=20, kernel_size=9, patch_size=7), **kwargs})
