"""CaiT: deeper ViTs with LayerScale, talking heads and late class attention.

Touvron et al., "Going deeper with Image Transformers", ICCV 2021.

A ViT with a twist: every self-attention block uses talking-heads attention and
LayerScale, the patch tokens are processed without a class token, and the class token
enters only in the last (class-attention) layers, which read the frozen patch tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, resample_pos_embed
from medvit.layers.attention_variants import TalkingHeadAttn
from medvit.layers.class_attention import ClassAttentionBlock
from medvit.models._features import collect_intermediates, feature_take_last, format_intermediate
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model

_POOLS = ("token", "avg", "")


def _talking_heads_block(uniform_drop_path: float, **kwargs: Any) -> Block:
    """A LayerScale block with talking-heads attention and the same drop rate at every depth.

    CaiT drops every block with the same probability instead of ViT's linear schedule,
    so the per-block `drop_path` ViT passes is replaced.
    """
    return Block(attn_layer=TalkingHeadAttn, **{**kwargs, "drop_path": uniform_drop_path})


class Cait(VisionTransformer):
    """CaiT: self-attention stage on the patch tokens, then class attention.

    Args:
        img_size: Input spatial size.
        patch_size: Patch extent.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` (class token after class attention), `avg` (mean of the
            patch tokens) or `` (no pooling).
        embed_dim: Token width.
        depth: Number of self-attention (talking-heads) blocks.
        num_heads: Attention heads, in both stages.
        mlp_ratio: MLP hidden width relative to `embed_dim`, in both stages.
        qkv_bias: Bias of the q/k/v projections.
        init_values: LayerScale initial value (the paper's epsilon: 1e-5 at depth 24,
            1e-6 deeper).
        class_attn_depth: Number of class-attention layers (2 in the paper).
        dynamic_img_size: Accept any input size the patch divides, resampling the position
            embedding on the fly.
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding the position embedding.
        proj_drop_rate: Dropout after the self-attention stage's projections.
        attn_drop_rate: Dropout on the self-attention stage's weights.
        drop_path_rate: Stochastic depth of every self-attention block (uniform, as the
            paper); the class-attention layers have none.
        norm_eps: LayerNorm epsilon.
        act_layer: MLP activation.
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).
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
        init_values: float = 1e-5,
        class_attn_depth: int = 2,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        if global_pool not in _POOLS:
            raise ValueError(f"CaiT's global_pool must be one of {_POOLS}, got {global_pool!r}")
        if class_attn_depth < 1:
            raise ValueError(f"class_attn_depth must be >= 1, got {class_attn_depth}")
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            init_values=init_values,
            class_token=True,
            no_embed_class=True,  # the class token joins after the position embedding
            fc_norm=False,
            dynamic_img_size=dynamic_img_size,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            act_layer=act_layer,
            freeze_patch_embed=freeze_patch_embed,
            block_fn=partial(_talking_heads_block, drop_path_rate),
        )
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        # no dropout or stochastic depth in the class-attention stage, as the paper's code
        self.blocks_token_only = nn.ModuleList(
            ClassAttentionBlock(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                init_values=init_values,
                norm_layer=norm_layer,
                act_layer=act_layer,
            )
            for _ in range(class_attn_depth)
        )
        for m in self.blocks_token_only.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        """Patch tokens plus position embedding; the class token waits for class attention."""
        pos = self.pos_embed
        if grid != self.grid_size:
            pos = resample_pos_embed(pos, grid, self.grid_size)
        return self.pos_drop(x + pos)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Run the class token through the class-attention layers and prepend it to `x`."""
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        for blk in self.blocks_token_only:
            cls_token = blk(x, cls_token)
        return torch.cat([cls_token, x], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Class token and patch tokens after both stages and the final norm, `(B, 1 + N, D)`."""
        x, _ = self.embed(x)
        return self.norm(self.forward_cls(self.blocks(x)))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of selected self-attention blocks (the patch tokens; there is no prefix yet).

        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Input `(B, C, H, W)`.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        x, grid = self.embed(x)
        final_norm = self.norm if norm else None
        x, feats = collect_intermediates(
            self.blocks, x, take, last, lambda y: format_intermediate(y, grid, output_fmt, final_norm)
        )
        if intermediates_only:
            return feats
        return self.norm(self.forward_cls(x)), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None and global_pool not in _POOLS:
            raise ValueError(f"CaiT's global_pool must be one of {_POOLS}, got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)


# -- registered variants ---------------------------------------------------------------
# Table 1 of the paper (timm's names): depth 24 (+2 class-attention layers), heads of width 48,
# patch 16, LayerScale initialised at 1e-5.
_CAIT = dict(patch_size=16, depth=24, init_values=1e-5)


@register_model
def cait_xxs24_224(**kwargs: Any) -> Cait:
    """CaiT-XXS24, width 192, 4 heads, 224 px (Touvron et al., 2021)."""
    return Cait(**{**_CAIT, **dict(img_size=224, embed_dim=192, num_heads=4), **kwargs})


@register_model
def cait_xs24_384(**kwargs: Any) -> Cait:
    """CaiT-XS24, width 288, 6 heads, 384 px (Touvron et al., 2021)."""
    return Cait(**{**_CAIT, **dict(img_size=384, embed_dim=288, num_heads=6), **kwargs})


@register_model
def cait_s24_224(**kwargs: Any) -> Cait:
    """CaiT-S24, width 384, 8 heads, 224 px (Touvron et al., 2021)."""
    return Cait(**{**_CAIT, **dict(img_size=224, embed_dim=384, num_heads=8), **kwargs})
