"""Transformer in Transformer (TNT): an inner transformer on pixel tokens inside each patch.

Han et al., "Transformer in Transformer", NeurIPS 2021.

Each 16x16 patch is embedded on its own by a strided convolution into a 4x4 grid of
"pixel" tokens. Every TNT block runs an inner transformer over the pixel tokens of each
patch, adds their (flattened, projected) result to the patch token, then runs an outer
transformer over the patch tokens. Inner and outer transformers are plain `Block`s.

This is timm's current (non-legacy) layout: the patch is cut out before the pixel
convolution, and the per-block projection is LayerNorm -> Linear (no bias) -> LayerNorm.
Parameter names follow timm's apart from the two blocks (`inner.*` / `outer.*`) and the
joint q/k/v projection; `medvit.convert.timm.tnt` maps them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, check_pool_type, drop_path_schedule, grid_for
from medvit.layers.attention_capture import attention_layout
from medvit.layers.helpers import to_ntuple
from medvit.models._features import TokenPoolHead, collect_intermediates, feature_take_last, format_intermediate
from medvit.registry import register_model

_POOLS = ("token", "avg", "")


class PixelEmbed(nn.Module):
    """Cut the image into patches and embed each one into a small grid of pixel tokens.

    The convolution runs on every patch separately (zero padding at the patch border),
    so pixel tokens never see a neighbouring patch.

    Args:
        img_size: Input size.
        patch_size: Patch extent.
        in_chans: Input channels.
        inner_dim: Width of the pixel tokens.
        stride: Stride of the 7x7 pixel convolution; a patch gives ceil(patch / stride)
            pixel tokens per side.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        inner_dim: int = 48,
        stride: int = 4,
    ) -> None:
        super().__init__()
        if stride < 1:
            raise ValueError(f"first_stride must be >= 1, got {stride}")
        self.img_size = to_ntuple(img_size, 2, "img_size")
        self.patch_size = to_ntuple(patch_size, 2, "patch_size")
        self.grid_size = grid_for(self.img_size, self.patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.pixel_grid = tuple(math.ceil(p / stride) for p in self.patch_size)
        self.num_pixel = math.prod(self.pixel_grid)
        self.proj = nn.Conv2d(in_chans, inner_dim, kernel_size=7, padding=3, stride=stride)

    def forward(self, x: torch.Tensor, pixel_pos: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` to pixel tokens `(B * patches, pixels, inner_dim)`."""
        if x.ndim != 4 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"expected input (batch, channels, {self.img_size[0]}, {self.img_size[1]}), "
                f"got shape {tuple(x.shape)}"
            )
        b, c = x.shape[:2]
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        # patches in row-major grid order, as nn.Unfold gives them
        x = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, ph, pw)
        x = self.proj(x) + pixel_pos
        return x.flatten(2).transpose(1, 2)


def _pixel_layout(num_pixel: int, num_patches: int) -> dict[str, object]:
    """`attention_layout` of the inner attention: pixels of one patch, patches on a square grid."""
    side, g = math.isqrt(num_pixel), math.isqrt(num_patches)
    if side * side != num_pixel or g * g != num_patches:
        return {}
    return {"query_grid": (side, side), "tiled_grid": (g * side, g * side), "query_prefix": 0, "key_prefix": 0}


class TNTBlock(nn.Module):
    """Inner block on pixel tokens, pixel-to-patch projection, outer block on patch tokens.

    Args:
        inner_dim: Pixel-token width.
        embed_dim: Patch-token width.
        num_pixel: Pixel tokens per patch.
        num_heads_inner: Heads of the inner attention.
        num_heads: Heads of the outer attention.
        mlp_ratio: Outer MLP hidden width relative to `embed_dim` (the inner one is 4).
        qkv_bias: Bias of the q/k/v projections.
        proj_drop: Dropout after attention/MLP projections.
        attn_drop: Dropout on attention weights.
        drop_path: Stochastic-depth probability of both blocks.
        act_layer: MLP activation.
        norm_layer: Norm class.
    """

    def __init__(
        self,
        inner_dim: int,
        embed_dim: int,
        num_pixel: int,
        num_heads_inner: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        common = dict(
            qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=drop_path,
            act_layer=act_layer, norm_layer=norm_layer,
        )
        self.inner = Block(inner_dim, num_heads_inner, mlp_ratio=4.0, **common)
        self.norm1_proj = norm_layer(inner_dim * num_pixel)
        self.proj = nn.Linear(inner_dim * num_pixel, embed_dim, bias=False)
        self.norm2_proj = norm_layer(embed_dim)
        self.outer = Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, **common)

    def forward(
        self, pixel_embed: torch.Tensor, patch_embed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = patch_embed.shape
        with attention_layout(**_pixel_layout(pixel_embed.shape[1], n - 1)):
            pixel_embed = self.inner(pixel_embed)
        update = self.norm2_proj(self.proj(self.norm1_proj(pixel_embed.reshape(b, n - 1, -1))))
        # the class token has no pixels
        patch_embed = torch.cat([patch_embed[:, :1], patch_embed[:, 1:] + update], dim=1)
        return pixel_embed, self.outer(patch_embed)


class TNT(TokenPoolHead, nn.Module):
    """Transformer in Transformer.

    Args:
        img_size: Input size (fixed: the position tables are not resampled on the fly).
        patch_size: Patch extent.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token`, `avg` (mean of the patch tokens) or `` (no pooling).
        embed_dim: Patch-token width.
        inner_dim: Pixel-token width.
        depth: Number of TNT blocks.
        num_heads: Heads of the outer (patch) attention.
        num_heads_inner: Heads of the inner (pixel) attention.
        mlp_ratio: Outer MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the q/k/v projections.
        first_stride: Stride of the pixel convolution (4: 16x16 patches give 4x4 pixels).
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding the patch position embedding.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
        norm_eps: LayerNorm epsilon (TNT uses PyTorch's default).
        act_layer: MLP activation.
        freeze_patch_embed: Keep the random pixel convolution fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        inner_dim: int = 48,
        depth: int = 12,
        num_heads: int = 12,
        num_heads_inner: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        first_stride: int = 4,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        self._check_pool(global_pool)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")

        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.spatial_dims = 2
        self.num_prefix_tokens = 1
        self.in_chans = in_chans

        self.pixel_embed = PixelEmbed(img_size, patch_size, in_chans, inner_dim, first_stride)
        self.img_size = self.pixel_embed.img_size
        self.patch_size = self.pixel_embed.patch_size
        self.grid_size = self.pixel_embed.grid_size
        num_pixel = self.pixel_embed.num_pixel
        if freeze_patch_embed:
            self.pixel_embed.requires_grad_(False)
        self.norm1_proj = norm_layer(num_pixel * inner_dim)
        self.proj = nn.Linear(num_pixel * inner_dim, embed_dim)
        self.norm2_proj = norm_layer(embed_dim)

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_pos = nn.Parameter(torch.zeros(1, self.pixel_embed.num_patches + 1, embed_dim))
        self.pixel_pos = nn.Parameter(torch.zeros(1, inner_dim, *self.pixel_embed.pixel_grid))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            TNTBlock(
                inner_dim,
                embed_dim,
                num_pixel,
                num_heads_inner=num_heads_inner,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                act_layer=act_layer,
                norm_layer=norm_layer,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if check_pool_type(global_pool) not in _POOLS:
            raise ValueError(f"TNT supports global_pool in {_POOLS}, got {global_pool!r}")

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.patch_pos, self.pixel_pos):
            nn.init.trunc_normal_(p, std=0.02)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel tokens `(B * N, pixels, inner_dim)` and patch tokens `(B, 1 + N, D)`."""
        b = x.shape[0]
        pixel_embed = self.pixel_embed(x, self.pixel_pos)
        patches = pixel_embed.reshape(b, -1, self.proj.in_features)
        patch_embed = self.norm2_proj(self.proj(self.norm1_proj(patches)))
        patch_embed = torch.cat([self.cls_token.expand(b, -1, -1), patch_embed], dim=1)
        return pixel_embed, self.pos_drop(patch_embed + self.patch_pos)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (class token first) after the last block and the final norm."""
        pixel_embed, patch_embed = self.embed(x)
        for blk in self.blocks:
            pixel_embed, patch_embed = blk(pixel_embed, patch_embed)
        return self.norm(patch_embed)

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
        return_prefix_tokens: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch-token outputs of selected blocks (the pixel tokens are not returned).

        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Input `(B, C, H, W)`.
            return_prefix_tokens: Return `(map, class_token)` pairs.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        final_norm = self.norm if norm else None
        # the state is (pixel_embed, patch_embed); only the patch tokens are returned
        (_, patch_embed), feats = collect_intermediates(
            self.blocks,
            self.embed(x),
            take,
            last,
            lambda s: format_intermediate(
                s[1], self.grid_size, output_fmt, final_norm, 1, return_prefix_tokens
            ),
            step=lambda blk, s: blk(*s),
        )
        if intermediates_only:
            return feats
        return self.norm(patch_embed), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# -- registered variants ---------------------------------------------------------------
# The paper's Table 1: TNT-S (384 / 24, 6 heads) and TNT-B (640 / 40, 10 heads).
@register_model
def tnt_s_patch16_224(**kwargs: Any) -> TNT:
    """TNT-S: outer width 384, inner width 24, depth 12, 6 heads, patch 16 (Han et al., 2021)."""
    cfg = dict(patch_size=16, embed_dim=384, inner_dim=24, depth=12, num_heads=6)
    return TNT(**{**cfg, **kwargs})


@register_model
def tnt_b_patch16_224(**kwargs: Any) -> TNT:
    """TNT-B: outer width 640, inner width 40, depth 12, 10 heads, patch 16 (Han et al., 2021)."""
    cfg = dict(patch_size=16, embed_dim=640, inner_dim=40, depth=12, num_heads=10)
    return TNT(**{**cfg, **kwargs})
