"""Pre-norm transformer block whose attention, MLP and norm are arguments."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from medvit.layers.attention import Attention
from medvit.layers.drop import DropPath
from medvit.layers.layer_scale import LayerScale
from medvit.layers.mlp import Mlp


class Block(nn.Module):
    """x + DropPath(LS(attn(norm1(x)))), then x + DropPath(LS(mlp(norm2(x)))).

    A derivative model swaps a part (`attn_layer`, `mlp_layer`, `norm_layer`) instead of
    copying the block.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: Hidden width of the MLP relative to `dim`.
        qkv_bias: Bias of the q/k/v projection.
        qk_norm: Per-head query/key normalisation.
        proj_drop: Dropout after the attention and MLP projections.
        attn_drop: Dropout on the attention weights.
        init_values: LayerScale initial value; None disables LayerScale.
        drop_path: Stochastic-depth probability of this block.
        act_layer: MLP activation.
        norm_layer: Norm class (called with `dim`).
        attn_layer: Attention class, called as `attn_layer(dim, num_heads=..., qkv_bias=...,
            qk_norm=..., attn_drop=..., proj_drop=..., norm_layer=...)`.
        mlp_layer: MLP class, called as `mlp_layer(dim, hidden, act_layer=..., drop=...)`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        attn = None
        if return_attn:
            y, attn = self.attn(self.norm1(x), return_attn=True)
        else:
            y = self.attn(self.norm1(x))
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, attn) if return_attn else x
