"""ViViT: pure-transformer video classification with four space-time factorisations.

Arnab et al., "ViViT: A Video Vision Transformer", ICCV 2021.

`attention_type` picks the paper's model: `st` (Model 1, joint spatio-temporal
attention over all tokens), `fe` (Model 2, factorised encoder: a spatial ViT with a class
token per time index, then a temporal transformer over those class tokens), `fsa`
(Model 3, each block does spatial then temporal self-attention) and `fdp` (Model 4, half
of the heads attend within a frame, half across frames). Tokens come from tubelet
embedding (`tubelet_size` frames x `patch_size`^2 pixels); `tubelet_size=1` is the
paper's uniform frame sampling. Spatial parameter names equal the image ViT's, so a 2D
checkpoint inflates with few changes (medvit.convert.inflate.vivit).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Attention, Block, PatchEmbed, check_pool_type, drop_path_schedule
from medvit.layers.attention_capture import attention_layout
from medvit.layers.factorised_attention import FactorisedDotProductAttention, FactorisedSelfAttentionBlock
from medvit.layers.helpers import to_ntuple
from medvit.models._features import TokenPoolHead, collect_intermediates, feature_take_last, format_intermediate
from medvit.registry import register_model

ATTENTION_TYPES = ("st", "fe", "fsa", "fdp")


class ViViT(TokenPoolHead, nn.Module):
    """Video Vision Transformer on clips `(B, C, T, H, W)`.

    Args:
        img_size: Frame size (H, W); an int is repeated.
        patch_size: Spatial extent of a tubelet.
        tubelet_size: Temporal extent of a tubelet (1: uniform frame sampling).
        num_frames: Clip length T.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` or `avg`; None = `token` for `st`/`fe`, `avg` for `fsa`/`fdp`
            (which have no class token, as in the paper's implementation).
        attention_type: `st`, `fe`, `fsa` or `fdp` (see the module docstring).
        embed_dim: Token width.
        depth: Number of (spatial, for `fe`) blocks.
        temporal_depth: Blocks of the temporal encoder (`fe` only).
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the q/k/v projections.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
        norm_eps: LayerNorm epsilon.
        act_layer: MLP activation.
        freeze_patch_embed: Keep the random tubelet projection fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        tubelet_size: int = 2,
        num_frames: int = 32,
        in_chans: int = 3,
        num_classes: int = 400,
        global_pool: str | None = None,
        attention_type: str = "st",
        embed_dim: int = 768,
        depth: int = 12,
        temporal_depth: int = 4,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        factorised = attention_type in ("fsa", "fdp")
        global_pool = ("avg" if factorised else "token") if global_pool is None else global_pool
        check_pool_type(global_pool)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg' for ViViT, got {global_pool!r}")
        if factorised and global_pool == "token":
            raise ValueError(f"attention_type={attention_type!r} has no class token; use global_pool='avg'")
        if depth < 1 or (attention_type == "fe" and temporal_depth < 1):
            raise ValueError(f"depth and temporal_depth must be >= 1, got {depth}, {temporal_depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.attention_type = attention_type
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.spatial_dims = 2
        self.in_chans = in_chans
        self.num_frames = num_frames
        self.img_size = to_ntuple(img_size, 2, "img_size")
        self.patch_embed = PatchEmbed(
            3, (num_frames, *self.img_size), (tubelet_size, patch_size, patch_size), in_chans, embed_dim, flatten=False
        )
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        self.grid_size = self.patch_embed.grid_size  # (T', H', W')
        t, n = self.grid_size[0], self.grid_size[1] * self.grid_size[2]
        # st: one class token before all tokens; fe: one per time index (the image ViT's).
        self.num_prefix_tokens = 0 if factorised else 1
        self.cls_token = None if factorised else nn.Parameter(torch.zeros(1, 1, embed_dim))
        n_pos = {"st": 1 + t * n, "fe": 1 + n}.get(attention_type, t * n)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, embed_dim))

        dpr = drop_path_schedule(drop_path_rate, depth + (temporal_depth if attention_type == "fe" else 0))
        block_kw = dict(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
            proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer, act_layer=act_layer,
        )
        if attention_type == "fsa":
            blocks = [FactorisedSelfAttentionBlock(drop_path=dpr[i], **block_kw) for i in range(depth)]
        else:
            attn = FactorisedDotProductAttention if attention_type == "fdp" else Attention
            blocks = [Block(drop_path=dpr[i], attn_layer=attn, **block_kw) for i in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm_layer(embed_dim)
        if attention_type == "fe":
            self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, 1 + t, embed_dim))
            self.temporal_blocks = nn.Sequential(
                *[Block(drop_path=dpr[depth + i], **block_kw) for i in range(temporal_depth)]
            )
            self.temporal_norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)
            elif name.endswith("cls_token"):
                nn.init.normal_(p, std=1e-6)

    # -- spatial encoder -----------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Tubelet tokens with position embedding: `(B, 1 + T'N, D)` for `st`,
        `(B*T', 1 + N, D)` for `fe`, `(B, T', N, D)` for `fsa`/`fdp`."""
        if x.ndim != 5:
            raise ValueError(f"expected a clip (B, C, T, H, W), got shape {tuple(x.shape)}")
        x = self.patch_embed(x)  # (B, D, T', H', W')
        b, d, t = x.shape[:3]
        x = x.flatten(3).permute(0, 2, 3, 1)  # (B, T', N, D)
        if self.attention_type == "st":
            x = x.reshape(b, -1, d)
            return torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        if self.attention_type == "fe":
            x = x.reshape(b * t, -1, d)
            return torch.cat([self.cls_token.expand(b * t, -1, -1), x], dim=1) + self.pos_embed
        return x + self.pos_embed.reshape(1, t, -1, d)

    def _patch_tokens(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Patch tokens of a spatial-encoder state as `(B, T', N, D)`."""
        if x.ndim == 4:
            return x
        return x[:, 1:].reshape(b, self.grid_size[0], -1, x.shape[-1])

    def _temporal(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Factorised encoder: class tokens of each time index through the temporal blocks."""
        x = x[:, 0].reshape(b, -1, x.shape[-1])
        x = torch.cat([self.temporal_cls_token.expand(b, -1, -1), x], dim=1) + self.temporal_pos_embed
        return self.temporal_norm(self.temporal_blocks(x))

    # -- common interface ----------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens: `(B, 1 + T'N, D)` (st), `(B, 1 + T', D)` (fe: the temporal
        encoder's), `(B, T'N, D)` (fsa, fdp)."""
        b = x.shape[0]
        # fe: the spatial encoder sees one time index per sequence
        with attention_layout(**(dict(axes=(1, 2)) if self.attention_type == "fe" else {})):
            x = self.norm(self.blocks(self.embed(x)))
        if self.attention_type == "fe":
            with attention_layout(axes=(0,)):
                return self._temporal(x, b)
        return x.flatten(1, 2) if x.ndim == 4 else x

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
        """Patch tokens after selected (spatial) blocks.

        For `fe` the blocks are those of the spatial encoder; the temporal encoder only
        sees class tokens, so it has no maps to give.
        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Clip `(B, C, T, H, W)`.
            norm: Apply the final (spatial) norm to each intermediate.
            output_fmt: `NCHW` (`(B, D, T', H', W')`) or `NLC` (`(B, T'N, D)`).
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        b = x.shape[0]
        x, feats = collect_intermediates(
            self.blocks,
            self.embed(x),
            take,
            last,
            lambda y: format_intermediate(
                self._patch_tokens(self.norm(y) if norm else y, b).flatten(1, 2), self.grid_size, output_fmt
            ),
        )
        if intermediates_only:
            return feats
        x = self.norm(x)
        if self.attention_type == "fe":
            x = self._temporal(x, b)
        elif x.ndim == 4:
            x = x.flatten(1, 2)
        return x, feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            if global_pool == "token" and self.num_prefix_tokens == 0:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# -- registered variants ---------------------------------------------------------------
# ViT-B and ViT-L widths, 16x16x2 tubelets, 32 frames of 224^2 (the paper's Kinetics
# setting), Kinetics-400 classes; the factorised encoder's temporal transformer has 4 layers.
_SIZES = {
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
}
_KINETICS = dict(img_size=224, patch_size=16, tubelet_size=2, num_frames=32, temporal_depth=4)


@register_model
def vivit_b_16x2_st(**kwargs: Any) -> ViViT:
    """ViViT-B/16x2 Model 1, joint space-time attention, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["b"], attention_type="st"), **kwargs})


@register_model
def vivit_b_16x2_fe(**kwargs: Any) -> ViViT:
    """ViViT-B/16x2 Model 2, factorised encoder, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["b"], attention_type="fe"), **kwargs})


@register_model
def vivit_b_16x2_fsa(**kwargs: Any) -> ViViT:
    """ViViT-B/16x2 Model 3, factorised self-attention, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["b"], attention_type="fsa"), **kwargs})


@register_model
def vivit_b_16x2_fdp(**kwargs: Any) -> ViViT:
    """ViViT-B/16x2 Model 4, factorised dot-product attention, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["b"], attention_type="fdp"), **kwargs})


@register_model
def vivit_l_16x2_st(**kwargs: Any) -> ViViT:
    """ViViT-L/16x2 Model 1, joint space-time attention, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["l"], attention_type="st"), **kwargs})


@register_model
def vivit_l_16x2_fe(**kwargs: Any) -> ViViT:
    """ViViT-L/16x2 Model 2, factorised encoder, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["l"], attention_type="fe"), **kwargs})


@register_model
def vivit_l_16x2_fsa(**kwargs: Any) -> ViViT:
    """ViViT-L/16x2 Model 3, factorised self-attention, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["l"], attention_type="fsa"), **kwargs})


@register_model
def vivit_l_16x2_fdp(**kwargs: Any) -> ViViT:
    """ViViT-L/16x2 Model 4, factorised dot-product attention, 32 frames of 224 px (Arnab et al., 2021)."""
    return ViViT(**{**dict(_KINETICS, **_SIZES["l"], attention_type="fdp"), **kwargs})
