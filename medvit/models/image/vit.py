"""Vision Transformer, for 2D images and (with `spatial_dims=3`) volumes.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
at Scale", ICLR 2021. Options from later work: GAP head and no class token, MAP head
(Zhai et al., "Scaling Vision Transformers", 2022), LayerScale (Touvron et al., 2021),
frozen random patch projection (Chen et al., MoCo v3, 2021).

Parameter names follow timm's, so its checkpoints need almost no mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import (
    AttentionPoolLatent,
    Block,
    PatchEmbed,
    check_pool_type,
    drop_path_schedule,
    pool_tokens,
    resample_pos_embed,
    sincos_pos_embed,
)
from medvit.layers.attention_capture import attention_maps
from medvit.models._features import (
    check_output_fmt,
    collect_intermediates,
    feature_take_last,
    format_intermediate,
)
from medvit.registry import register_model

POS_EMBED_TYPES = ("learn", "sincos", "none")


class VisionTransformer(nn.Module):
    """Plain ViT: patch embedding, prefix tokens, a stack of `Block`s, a pooling head.

    Args:
        img_size: Input spatial size (an int is repeated over `spatial_dims`).
        patch_size: Patch extent.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` (class token), `avg` (mean of patch tokens), `map`
            (attention pooling) or `` (no pooling: `forward` returns the tokens).
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the q/k/v projection.
        qk_norm: Per-head query/key normalisation.
        init_values: LayerScale initial value (None: no LayerScale).
        class_token: Prepend a class token.
        no_embed_class: Position embedding covers only the patch tokens; prefix tokens are
            added after it (DeiT-III, MONAI's ViT).
        pos_embed: `learn`, `sincos` (fixed) or `none`.
        pre_norm: Norm before the blocks (CLIP).
        fc_norm: Norm after pooling instead of before; None = True for `avg`.
        dynamic_img_size: Accept any input size the patch divides, resampling the position
            embedding on the fly.
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding the position embedding.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
        norm_eps: LayerNorm epsilon (1e-6 as timm; MONAI uses 1e-5).
        act_layer: MLP activation.
        spatial_dims: 2 for images, 3 for volumes.
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).
        block_fn: Block class (a derivative swaps it).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        pos_embed: str = "learn",
        pre_norm: bool = False,
        fc_norm: bool | None = None,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        spatial_dims: int = 2,
        freeze_patch_embed: bool = False,
        block_fn: Callable[..., nn.Module] = Block,
    ) -> None:
        super().__init__()
        check_pool_type(global_pool)
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed must be one of {POS_EMBED_TYPES}, got {pos_embed!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.spatial_dims = spatial_dims
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size

        self.patch_embed = PatchEmbed(
            spatial_dims,
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            bias=not pre_norm,
            strict_img_size=not dynamic_img_size,
        )
        self.grid_size = self.patch_embed.grid_size
        self.patch_size = self.patch_embed.patch_size
        self.img_size = self.patch_embed.img_size
        self.in_chans = in_chans
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        n_pos = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, n_pos, embed_dim) * 0.02)
        elif pos_embed == "sincos":
            table = sincos_pos_embed(self.grid_size, embed_dim)
            if n_pos > table.shape[0]:
                table = torch.cat([table.new_zeros(n_pos - table.shape[0], embed_dim), table])
            self.register_buffer("pos_embed", table.unsqueeze(0), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()

        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *[
                block_fn(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_norm=qk_norm,
                    init_values=init_values,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim) if not use_fc_norm else nn.Identity()
        self.attn_pool = (
            AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm_layer=norm_layer, act_layer=act_layer)
            if global_pool == "map"
            else None
        )
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    # -- embedding ---------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        pos = self.pos_embed
        if pos is not None and grid != self.grid_size:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos = resample_pos_embed(pos, grid, self.grid_size, num_prefix_tokens=prefix)
        prefix_tokens = [self.cls_token.expand(x.shape[0], -1, -1)] if self.cls_token is not None else []
        if self.no_embed_class:
            if pos is not None:
                x = x + pos
            x = torch.cat(prefix_tokens + [x], dim=1)
        else:
            x = torch.cat(prefix_tokens + [x], dim=1)
            if pos is not None:
                x = x + pos
        return self.pos_drop(x)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Patch tokens with prefix tokens and position embedding, and their grid."""
        grid = self.patch_embed.dynamic_grid(x.shape[2:]) if x.ndim == self.spatial_dims + 2 else ()
        x = self.patch_embed(x)
        return self.norm_pre(self._pos_embed(x, grid)), grid

    # -- common interface ----------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, `(B, prefix + N, D)`."""
        x, _ = self.embed(x)
        return self.norm(self.blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens and classify (or return the pooled vector with `pre_logits`)."""
        x = self.attn_pool(x) if self.attn_pool is not None else pool_tokens(
            x, self.global_pool, self.num_prefix_tokens
        )
        x = self.head_drop(self.fc_norm(x))
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
        return_prefix_tokens: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of selected blocks, as channels-first maps or token sequences.

        Arguments and return value as the common interface (`medvit.models._features`);
        `return_prefix_tokens` gives `(map, prefix_tokens)` pairs.

        Args:
            x: Input `(B, C, *spatial)`.
        """
        check_output_fmt(output_fmt)
        x, grid = self.embed(x)
        return self._block_intermediates(
            x, grid, [], indices, norm, output_fmt, intermediates_only, stop_early, return_prefix_tokens
        )

    def _block_intermediates(
        self,
        x: torch.Tensor,
        grid: Sequence[int],
        feats: list,
        indices: int | Sequence[int] | None,
        norm: bool,
        output_fmt: str,
        intermediates_only: bool,
        stop_early: bool,
        return_prefix_tokens: bool,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The block loop of `forward_intermediates` on embedded tokens, appending to `feats`."""
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        final_norm = self.norm if norm else None
        x, taken = collect_intermediates(
            self.blocks,
            x,
            take,
            last,
            lambda y: format_intermediate(
                y, grid, output_fmt, final_norm, self.num_prefix_tokens, return_prefix_tokens
            ),
        )
        feats.extend(taken)
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Softmax weights of every self-attention layer, each `(B, heads, T, T)` (`capture_attention`)."""
        return attention_maps(self, x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            check_pool_type(global_pool)
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("cannot switch to a MAP head after construction")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# -- registered variants ---------------------------------------------------------------
# Widths, depths and heads of the ViT paper's Table 1, plus DeiT's Ti/S (timm's names).
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}
# volumes: one input channel (CT/MR), 96^3 crops (UNETR's), features only
_VOLUME = dict(img_size=96, patch_size=16, in_chans=1, num_classes=0, spatial_dims=3)


@register_model
def vit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16, 224 px (DeiT's Ti, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, **_SIZES["tiny"]), **kwargs})


@register_model
def vit_tiny_patch16_384(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16, 384 px (DeiT's Ti, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, **_SIZES["tiny"]), **kwargs})


@register_model
def vit_tiny_patch32_224(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/32, 224 px (DeiT's Ti, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=32, **_SIZES["tiny"]), **kwargs})


@register_model
def vit_tiny_patch32_384(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/32, 384 px (DeiT's Ti, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=32, **_SIZES["tiny"]), **kwargs})


@register_model
def vit_tiny_patch14_224(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/14, 224 px (DeiT's Ti, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=14, **_SIZES["tiny"]), **kwargs})


@register_model
def vit_tiny_patch16_96_3d(**kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 in 3D: one input channel (CT/MR), 96^3 crops, features only."""
    return VisionTransformer(**{**_VOLUME, **_SIZES["tiny"], **kwargs})


@register_model
def vit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16, 224 px (DeiT's S, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, **_SIZES["small"]), **kwargs})


@register_model
def vit_small_patch16_384(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16, 384 px (DeiT's S, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, **_SIZES["small"]), **kwargs})


@register_model
def vit_small_patch32_224(**kwargs: Any) -> VisionTransformer:
    """ViT-S/32, 224 px (DeiT's S, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=32, **_SIZES["small"]), **kwargs})


@register_model
def vit_small_patch32_384(**kwargs: Any) -> VisionTransformer:
    """ViT-S/32, 384 px (DeiT's S, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=32, **_SIZES["small"]), **kwargs})


@register_model
def vit_small_patch14_224(**kwargs: Any) -> VisionTransformer:
    """ViT-S/14, 224 px (DeiT's S, Touvron et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=14, **_SIZES["small"]), **kwargs})


@register_model
def vit_small_patch16_96_3d(**kwargs: Any) -> VisionTransformer:
    """ViT-S/16 in 3D: one input channel (CT/MR), 96^3 crops, features only."""
    return VisionTransformer(**{**_VOLUME, **_SIZES["small"], **kwargs})


@register_model
def vit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, **_SIZES["base"]), **kwargs})


@register_model
def vit_base_patch16_384(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16, 384 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, **_SIZES["base"]), **kwargs})


@register_model
def vit_base_patch32_224(**kwargs: Any) -> VisionTransformer:
    """ViT-B/32, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=32, **_SIZES["base"]), **kwargs})


@register_model
def vit_base_patch32_384(**kwargs: Any) -> VisionTransformer:
    """ViT-B/32, 384 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=32, **_SIZES["base"]), **kwargs})


@register_model
def vit_base_patch14_224(**kwargs: Any) -> VisionTransformer:
    """ViT-B/14, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=14, **_SIZES["base"]), **kwargs})


@register_model
def vit_base_patch16_96_3d(**kwargs: Any) -> VisionTransformer:
    """ViT-B/16 in 3D: one input channel (CT/MR), 96^3 crops, features only."""
    return VisionTransformer(**{**_VOLUME, **_SIZES["base"], **kwargs})


@register_model
def vit_large_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, **_SIZES["large"]), **kwargs})


@register_model
def vit_large_patch16_384(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16, 384 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, **_SIZES["large"]), **kwargs})


@register_model
def vit_large_patch32_224(**kwargs: Any) -> VisionTransformer:
    """ViT-L/32, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=32, **_SIZES["large"]), **kwargs})


@register_model
def vit_large_patch32_384(**kwargs: Any) -> VisionTransformer:
    """ViT-L/32, 384 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=32, **_SIZES["large"]), **kwargs})


@register_model
def vit_large_patch14_224(**kwargs: Any) -> VisionTransformer:
    """ViT-L/14, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=14, **_SIZES["large"]), **kwargs})


@register_model
def vit_large_patch16_96_3d(**kwargs: Any) -> VisionTransformer:
    """ViT-L/16 in 3D: one input channel (CT/MR), 96^3 crops, features only."""
    return VisionTransformer(**{**_VOLUME, **_SIZES["large"], **kwargs})


@register_model
def vit_huge_patch16_224(**kwargs: Any) -> VisionTransformer:
    """ViT-H/16, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, **_SIZES["huge"]), **kwargs})


@register_model
def vit_huge_patch16_384(**kwargs: Any) -> VisionTransformer:
    """ViT-H/16, 384 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, **_SIZES["huge"]), **kwargs})


@register_model
def vit_huge_patch32_224(**kwargs: Any) -> VisionTransformer:
    """ViT-H/32, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=32, **_SIZES["huge"]), **kwargs})


@register_model
def vit_huge_patch32_384(**kwargs: Any) -> VisionTransformer:
    """ViT-H/32, 384 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=384, patch_size=32, **_SIZES["huge"]), **kwargs})


@register_model
def vit_huge_patch14_224(**kwargs: Any) -> VisionTransformer:
    """ViT-H/14, 224 px (Dosovitskiy et al., 2021)."""
    return VisionTransformer(**{**dict(img_size=224, patch_size=14, **_SIZES["huge"]), **kwargs})


@register_model
def vit_huge_patch16_96_3d(**kwargs: Any) -> VisionTransformer:
    """ViT-H/16 in 3D: one input channel (CT/MR), 96^3 crops, features only."""
    return VisionTransformer(**{**_VOLUME, **_SIZES["huge"], **kwargs})
