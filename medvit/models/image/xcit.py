"""XCiT: transformers whose attention mixes channels, linear in the number of tokens.

El-Nouby et al., "XCiT: Cross-Covariance Image Transformers", NeurIPS 2021.

A convolutional stem of stride-2 3x3 convolutions makes the tokens, a Fourier-feature
position encoding is added, then each block applies cross-covariance attention (XCA),
local patch interaction (LPI: depthwise convolutions over the token grid) and an MLP,
each with LayerScale. Two class-attention layers (CaiT's) produce the class token.
Nothing depends on a fixed token count, so any input size the patch divides is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, DropPath, LayerScale, grid_for
from medvit.layers.attention_variants import XCA
from medvit.layers.class_attention import ClassAttentionBlock
from medvit.layers.helpers import to_ntuple
from medvit.models._features import TokenPoolHead, collect_intermediates, feature_take_last, format_intermediate
from medvit.registry import register_model

_POOLS = ("token", "avg", "")


def _conv3x3_bn(in_chans: int, out_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_chans),
    )


class ConvPatchEmbed(nn.Module):
    """Patch embedding by stride-2 3x3 conv + BN layers with activations between them.

    Four layers (width D/8, D/4, D/2, D) for 16-pixel patches, three (D/4, D/2, D) for 8.

    Args:
        patch_size: 8 or 16.
        in_chans: Input channels.
        embed_dim: Token width.
        act_layer: Activation between the layers.
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        act_layer: Callable[[], nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if patch_size not in (8, 16):
            raise ValueError(
                f"XCiT's convolutional patch embedding needs patch_size 8 or 16, got {patch_size}"
            )
        n = int(math.log2(patch_size))
        if embed_dim < 2 ** (n - 1):
            raise ValueError(f"embed_dim {embed_dim} is too small for {n} stem layers")
        widths = [in_chans] + [embed_dim // 2 ** (n - 1 - i) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            if i:
                layers.append(act_layer())
            layers.append(_conv3x3_bn(widths[i], widths[i + 1]))
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens `(B, N, D)` and their grid."""
        if x.ndim != 4:
            raise ValueError(f"expected a 4D input (batch, channels, H, W), got shape {tuple(x.shape)}")
        grid_for(x.shape[2:], self.patch_size, "input size")
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


class PositionalEncodingFourier(nn.Module):
    """Sin-cos features of the normalised (y, x) token coordinates, projected to the width.

    Coordinates are scaled to (0, 2 pi] whatever the grid, so the encoding adapts to any
    input size.

    Args:
        hidden_dim: Features per axis before the projection.
        dim: Token width.
        temperature: Frequency base.
    """

    def __init__(self, hidden_dim: int = 32, dim: int = 768, temperature: float = 10000.0) -> None:
        super().__init__()
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
        self.hidden_dim = hidden_dim
        self.temperature = temperature

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        """The encoding of a `(H, W)` token grid, `(1, H * W, dim)`."""
        h, w = grid
        weight = self.token_projection.weight
        eps, scale = 1e-6, 2 * math.pi
        y = torch.arange(1, h + 1, device=weight.device, dtype=torch.float32)
        x = torch.arange(1, w + 1, device=weight.device, dtype=torch.float32)
        y = (y / (y[-1] + eps) * scale)[:, None].expand(h, w)
        x = (x / (x[-1] + eps) * scale)[None, :].expand(h, w)
        dim_t = torch.arange(self.hidden_dim, device=weight.device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)

        def features(coord: torch.Tensor) -> torch.Tensor:
            p = coord[..., None] / dim_t
            return torch.stack([p[..., 0::2].sin(), p[..., 1::2].cos()], dim=-1).flatten(-2)

        pos = torch.cat([features(y), features(x)], dim=-1).permute(2, 0, 1)[None]
        pos = self.token_projection(pos.to(weight.dtype))
        return pos.flatten(2).transpose(1, 2)


class LPI(nn.Module):
    """Local patch interaction: depthwise conv - activation - BN - depthwise conv on the grid.

    Gives tokens explicit exchange with their 3x3 neighbours, which XCA (mixing channels,
    not tokens) lacks.

    Args:
        dim: Token width.
        act_layer: Activation.
        kernel_size: Depthwise kernel size.
    """

    def __init__(self, dim: int, act_layer: Callable[[], nn.Module] = nn.GELU, kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)
        self.act = act_layer()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=pad, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, *grid)
        x = self.conv2(self.bn(self.act(self.conv1(x))))
        return x.reshape(b, c, n).transpose(1, 2)


class XCABlock(Block):
    """`Block` with XCA attention and an LPI branch (with its own norm and LayerScale).

    x + attn, then x + LPI, then x + MLP, each pre-norm with LayerScale. The LPI
    branch's modules are numbered 3 (`norm3`, `ls3`) because the paper's code (and so
    its checkpoints) numbers them so.

    Args:
        dim: Token width.
        num_heads: XCA heads.
        init_values: LayerScale initial value (the paper's eta); None disables it.
        drop_path: Stochastic-depth probability of each branch.
        act_layer: Activation of the MLP and LPI.
        norm_layer: Norm class of the three branches.
        **kwargs: The other arguments of `Block`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        init_values: float | None = 1.0,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            dim,
            num_heads,
            init_values=init_values,
            drop_path=drop_path,
            act_layer=act_layer,
            norm_layer=norm_layer,
            attn_layer=XCA,
            **kwargs,
        )
        self.norm3 = norm_layer(dim)
        self.local_mp = LPI(dim, act_layer=act_layer)
        self.ls3 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path3 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # type: ignore[override]
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path3(self.ls3(self.local_mp(self.norm3(x), grid)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class XCiTClassAttentionBlock(ClassAttentionBlock):
    """XCiT's class-attention layer, computed as the paper's code does.

    Unlike CaiT's layer, the patch tokens change too: they receive the LayerScaled
    `norm1` of themselves, and the MLP residual is taken after `norm2` (applied to the
    class token, or to every token with `tokens_norm`). Pretrained XCiT weights depend
    on this, so it is kept.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        tokens_norm: Apply `norm2` to every token, not only the class token.
        **kwargs: The other arguments of `Block`.
    """

    def __init__(self, dim: int, num_heads: int, tokens_norm: bool = False, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.tokens_norm = tokens_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """All tokens `(B, 1 + N, D)`, class token first, in and out."""
        xn = self.norm1(x)
        x = x + self.drop_path1(self.ls1(torch.cat([self.attn(xn), xn[:, 1:]], dim=1)))
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat([self.norm2(x[:, :1]), x[:, 1:]], dim=1)
        y = torch.cat([self.ls2(self.mlp(x[:, :1])), x[:, 1:]], dim=1)
        return x + self.drop_path2(y)


class Xcit(TokenPoolHead, nn.Module):
    """XCiT: conv stem, Fourier position encoding, XCA blocks, class attention, head.

    Args:
        img_size: Nominal input size (the model accepts any size `patch_size` divides).
        patch_size: 8 or 16.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` (class token after class attention), `avg` (mean of the
            patch tokens) or `` (no pooling).
        embed_dim: Token width.
        depth: Number of XCA blocks.
        num_heads: Attention heads (XCA and class attention).
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the q/k/v projections.
        init_values: LayerScale initial value (the paper's eta); None disables it.
        class_attn_depth: Number of class-attention layers.
        tokens_norm: The class-attention layers normalise every token, not only the class
            token (the released p16 models do).
        use_pos_embed: Add the Fourier position encoding.
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding the position encoding.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of every XCA block (uniform, as the paper's code).
        norm_eps: LayerNorm epsilon.
        act_layer: Activation of the stem, LPI and MLPs.
        freeze_patch_embed: Keep the random convolutional stem fixed (MoCo v3; its BN
            statistics still update in training).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float | None = 1.0,
        class_attn_depth: int = 2,
        tokens_norm: bool = False,
        use_pos_embed: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if global_pool not in _POOLS:
            raise ValueError(f"XCiT's global_pool must be one of {_POOLS}, got {global_pool!r}")
        if depth < 1 or class_attn_depth < 1:
            raise ValueError(
                f"depth and class_attn_depth must be >= 1, got {depth}, {class_attn_depth}"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.spatial_dims = 2
        self.num_prefix_tokens = 1
        self.in_chans = in_chans
        self.img_size = to_ntuple(img_size, 2, "img_size")

        self.patch_embed = ConvPatchEmbed(patch_size, in_chans, embed_dim, act_layer=act_layer)
        self.patch_size = self.patch_embed.patch_size
        self.grid_size = grid_for(self.img_size, self.patch_size)
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = PositionalEncodingFourier(dim=embed_dim) if use_pos_embed else None
        self.pos_drop = nn.Dropout(pos_drop_rate)

        common: dict[str, Any] = dict(
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            init_values=init_values,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )
        self.blocks = nn.ModuleList(
            XCABlock(embed_dim, num_heads, drop_path=drop_path_rate, **common) for _ in range(depth)
        )
        # no stochastic depth in the class-attention layers, as the paper's code
        self.cls_attn_blocks = nn.ModuleList(
            XCiTClassAttentionBlock(embed_dim, num_heads, tokens_norm=tokens_norm, **common)
            for _ in range(class_attn_depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens with the position encoding, and their grid."""
        x, grid = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed(grid)
        return self.pos_drop(x), grid

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token and run the class-attention layers."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.cls_attn_blocks:
            x = blk(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Class and patch tokens after the class-attention layers and the norm, `(B, 1 + N, D)`."""
        x, grid = self.embed(x)
        for blk in self.blocks:
            x = blk(x, grid)
        return self.norm(self.forward_cls(x))

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
        """Outputs of selected XCA blocks (patch tokens; the class token joins later).

        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Input `(B, C, H, W)`.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        x, grid = self.embed(x)
        final_norm = self.norm if norm else None
        x, feats = collect_intermediates(
            self.blocks,
            x,
            take,
            last,
            lambda y: format_intermediate(y, grid, output_fmt, final_norm),
            step=lambda blk, y: blk(y, grid),
        )
        if intermediates_only:
            return feats
        return self.norm(self.forward_cls(x)), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            if global_pool not in _POOLS:
                raise ValueError(f"XCiT's global_pool must be one of {_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# -- registered variants ---------------------------------------------------------------
# The paper's Table 1 (timm's names): 12 XCA blocks, 16-pixel patches, head width 48.
_XCIT_12_P16 = dict(img_size=224, patch_size=16, depth=12, init_values=1.0, tokens_norm=True)


@register_model
def xcit_tiny_12_p16_224(**kwargs: Any) -> Xcit:
    """XCiT-T12/16: width 192, 4 heads, 224 px (El-Nouby et al., 2021)."""
    return Xcit(**{**dict(_XCIT_12_P16, embed_dim=192, num_heads=4), **kwargs})


@register_model
def xcit_small_12_p16_224(**kwargs: Any) -> Xcit:
    """XCiT-S12/16: width 384, 8 heads, 224 px (El-Nouby et al., 2021)."""
    return Xcit(**{**dict(_XCIT_12_P16, embed_dim=384, num_heads=8), **kwargs})
