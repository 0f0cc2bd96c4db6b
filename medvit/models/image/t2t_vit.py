"""T2T-ViT: Tokens-to-Token ViT.

Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on
ImageNet", ICCV 2021.

The linear patch embedding is replaced by the tokens-to-token (T2T) module: a soft split
(an overlapping unfold, 7x7 patches with stride 4) turns the image into tokens, and twice
a small transformer layer re-structures them, they are put back on their grid and soft
split again (3x3, stride 2), so neighbouring tokens are aggregated progressively; a
linear layer projects the final 3x3 neighbourhoods (16 pixels apart, as ViT's patches) to
the token width. The backbone is a narrow, deep ViT with a fixed sinusoidal position
embedding over the token sequence.

The paper's T2T-ViT-14/19/24 use Performer layers in the T2T module and T2T-ViT_t-14/19/24
plain attention; the parameter counts differ by a few thousand. This implementation
builds the plain-attention (transformer) T2T layers, which compute exact attention, for
every variant. As in the official code (github.com/yitu-opensource/T2T-ViT), the T2T
layers change the token width inside attention, keep a residual through the values, and
scale the logits by the input width (`(C k^2) ** -0.5`, not the head width).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Mlp, PatchEmbed, grid_for, sincos_pos_embed
from medvit.layers.attention_capture import attend
from medvit.layers.helpers import to_ntuple
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model

# kernel, stride, padding of the three soft splits; together they stride 16
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


class T2TAttention(nn.Module):
    """Attention that maps `dim`-wide tokens to `in_dim`-wide ones, residual through v.

    Args:
        dim: Input width (a soft split's `C k^2`).
        in_dim: Output width.
        num_heads: Attention heads (1 in the paper).
        qkv_bias: Bias of the q/k/v projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if in_dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({in_dim})")
        self.num_heads = num_heads
        self.in_dim = in_dim
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, in_dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(in_dim, in_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.in_dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y = attend(self, q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(b, n, self.in_dim)))
        # the input width differs from the output's, so the residual goes through v
        return v.transpose(1, 2).reshape(b, n, self.in_dim) + y


class TokenTransformer(nn.Module):
    """One T2T layer: `y = T2TAttention(norm1(x))`, then `y + mlp(norm2(y))`.

    Args:
        dim: Input width.
        in_dim: Output width.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `in_dim`.
        norm_layer: Norm class.
        act_layer: MLP activation.
    """

    def __init__(
        self,
        dim: int,
        in_dim: int,
        num_heads: int = 1,
        mlp_ratio: float = 1.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = T2TAttention(dim, in_dim, num_heads)
        self.norm2 = norm_layer(in_dim)
        self.mlp = Mlp(in_dim, int(in_dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class T2TModule(nn.Module):
    """Tokens-to-token embedding: soft split, (T2T layer, re-structurise, soft split) x 2, project.

    A drop-in for `PatchEmbed` with patch size 16: the same token grid, attributes and
    input validation.

    Args:
        img_size: Input size; multiples of 16.
        in_chans: Input channels.
        embed_dim: Token width.
        token_dim: Width of the tokens inside the module.
        strict_img_size: Raise when the input size differs from `img_size`.
    """

    # the same input validation as the plain patch embedding
    dynamic_grid = PatchEmbed.dynamic_grid

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        embed_dim: int = 768,
        token_dim: int = 64,
        strict_img_size: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = to_ntuple(img_size, 2, "img_size")
        self.patch_size = (16, 16)
        self.grid_size = grid_for(self.img_size, self.patch_size)
        self.num_patches = math.prod(self.grid_size)
        self.strict_img_size = strict_img_size
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = SOFT_SPLITS
        self.soft_split0 = nn.Unfold(k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(k2, stride=s2, padding=p2)
        self.attention1 = TokenTransformer(in_chans * k0 * k0, token_dim)
        self.attention2 = TokenTransformer(token_dim * k1 * k1, token_dim)
        self.proj = nn.Linear(token_dim * k2 * k2, embed_dim)

    def soft_split_grids(self, size: Sequence[int]) -> list[tuple[int, int]]:
        """Token grid after each of the three soft splits of an input of spatial `size`."""
        grids, (h, w) = [], tuple(size)
        for k, s, p in SOFT_SPLITS:
            h, w = _split_size(h, k, s, p), _split_size(w, k, s, p)
            grids.append((h, w))
        return grids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(
                f"expected a 4D input (batch, channels, height, width), got shape {tuple(x.shape)}"
            )
        self.dynamic_grid(x.shape[2:])
        (h0, w0), (h1, w1), _ = self.soft_split_grids(x.shape[2:])
        x = self.attention1(self.soft_split0(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h0, w0)
        x = self.attention2(self.soft_split1(x).transpose(1, 2))
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h1, w1)
        return self.proj(self.soft_split2(x).transpose(1, 2))


def sequence_sincos(num_tokens: int, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of token positions 0..num_tokens-1 (class token first), `(1, T, D)`."""
    return sincos_pos_embed((num_tokens,), dim).unsqueeze(0)


class T2TViT(VisionTransformer):
    """ViT whose tokens come from a token-embedding module replacing the patch projection.

    `T2TViT` builds the T2T module; a subclass changes the embedding by overriding
    `build_token_embed` (So-ViT). With `pos_embed='sincos'` (the paper's) the position
    embedding is the fixed 1D sinusoid over the token sequence, recomputed for the
    sequence length of other input sizes.

    Args:
        img_size: Input size; multiples of 16.
        in_chans: Input channels.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the q/k/v projections.
        token_dim: Width inside the token-embedding module.
        pos_embed: `sincos` (fixed, over the sequence), `learn` or `none`.
        norm_eps: LayerNorm epsilon (PyTorch's default, as the official code).
        dynamic_img_size: Accept any input size that is a multiple of 16.
        freeze_patch_embed: Keep the final projection of the token embedding fixed
            (MoCo v3's trick; the layers before it stay trainable).
        **kwargs: The remaining `VisionTransformer` arguments (`num_classes`,
            `global_pool`, `drop_path_rate`, ...).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 14,
        num_heads: int = 6,
        mlp_ratio: float = 3.0,
        qkv_bias: bool = False,
        token_dim: int = 64,
        pos_embed: str = "sincos",
        norm_eps: float = 1e-5,
        dynamic_img_size: bool = False,
        freeze_patch_embed: bool = False,
        **kwargs: Any,
    ) -> None:
        for arg in ("patch_size", "spatial_dims", "no_embed_class"):
            if arg in kwargs:
                raise ValueError(
                    f"{type(self).__name__} does not take {arg}: its tokens are 2D, 16 pixels apart"
                )
        super().__init__(
            img_size=img_size,
            patch_size=16,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            pos_embed=pos_embed,
            norm_eps=norm_eps,
            dynamic_img_size=dynamic_img_size,
            spatial_dims=2,
            **kwargs,
        )
        # Same img_size and patch size 16 as the plain embedding the parent built, so its
        # grid, learned position table and attributes stay valid.
        self.patch_embed = self.build_token_embed(
            img_size, in_chans, embed_dim, token_dim, strict_img_size=not dynamic_img_size
        )
        if freeze_patch_embed:
            self.patch_embed.proj.requires_grad_(False)
        if pos_embed == "sincos":
            self.pos_embed = sequence_sincos(self.pos_embed.shape[1], embed_dim)
        self._init_weights()

    def build_token_embed(
        self,
        img_size: int | Sequence[int],
        in_chans: int,
        embed_dim: int,
        token_dim: int,
        strict_img_size: bool,
    ) -> nn.Module:
        """The token embedding (T2T module); it must stride 16 and have a `proj` layer last."""
        return T2TModule(img_size, in_chans, embed_dim, token_dim, strict_img_size)

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        if isinstance(self.pos_embed, nn.Parameter) or self.pos_embed is None:
            return super()._pos_embed(x, grid)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = self.pos_embed
        if pos.shape[1] != x.shape[1]:
            pos = sequence_sincos(x.shape[1], self.embed_dim).to(x)
        return self.pos_drop(x + pos)


# -- registered variants ---------------------------------------------------------------
# Table 2 of the paper (T2T-ViT-14/19/24: 21.5M / 39.2M / 64.1M with the position table).
_T2T = dict(img_size=224, mlp_ratio=3.0, token_dim=64)


@register_model
def t2t_vit_14(**kwargs: Any) -> T2TViT:
    """T2T-ViT-14: width 384, depth 14, 6 heads, 224 px (Yuan et al., 2021)."""
    return T2TViT(**{**dict(_T2T, embed_dim=384, depth=14, num_heads=6), **kwargs})


@register_model
def t2t_vit_19(**kwargs: Any) -> T2TViT:
    """T2T-ViT-19: width 448, depth 19, 7 heads, 224 px (Yuan et al., 2021)."""
    return T2TViT(**{**dict(_T2T, embed_dim=448, depth=19, num_heads=7), **kwargs})


@register_model
def t2t_vit_24(**kwargs: Any) -> T2TViT:
    """T2T-ViT-24: width 512, depth 24, 8 heads, 224 px (Yuan et al., 2021)."""
    return T2TViT(**{**dict(_T2T, embed_dim=512, depth=24, num_heads=8), **kwargs})
