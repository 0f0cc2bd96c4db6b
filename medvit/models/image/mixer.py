"""MLP-Mixer: patches mixed by MLPs across tokens and across channels, no attention.

Tolstikhin et al., "MLP-Mixer: An all-MLP Architecture for Vision", NeurIPS 2021.

Parameter names follow timm's `MlpMixer`, so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import DropPath, Mlp, PatchEmbed, drop_path_schedule
from medvit.models._features import collect_intermediates, feature_take_last, format_intermediate
from medvit.registry import register_model

POOL_TYPES = ("avg", "")


def _check_pool(global_pool: str) -> str:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES} for MLP-Mixer, got {global_pool!r}")
    return global_pool


class MixerBlock(nn.Module):
    """x + token-mixing MLP (across the N tokens), then x + channel-mixing MLP (across D).

    Args:
        dim: Token width (the paper's C).
        seq_len: Number of tokens; the token-mixing MLP is sized for it, so the input
            resolution is fixed.
        mlp_ratio: Hidden widths of the token- and channel-mixing MLPs relative to `dim`
            (the paper's D_S / C and D_C / C); one float sets both.
        act_layer: MLP activation.
        norm_layer: Norm class (called with `dim`).
        drop: Dropout inside the MLPs.
        drop_path: Stochastic-depth probability of this block.
    """

    def __init__(
        self,
        dim: int,
        seq_len: int,
        mlp_ratio: float | Sequence[float] = (0.5, 4.0),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        ratios = (mlp_ratio, mlp_ratio) if isinstance(mlp_ratio, (int, float)) else tuple(mlp_ratio)
        if len(ratios) != 2:
            raise ValueError(f"mlp_ratio must be a float or a (tokens, channels) pair, got {mlp_ratio}")
        tokens_dim, channels_dim = (int(r * dim) for r in ratios)
        self.norm1 = norm_layer(dim)
        self.mlp_tokens = Mlp(seq_len, tokens_dim, act_layer=act_layer, drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp_channels = Mlp(dim, channels_dim, act_layer=act_layer, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.drop_path(self.mlp_channels(self.norm2(x)))


class MlpMixer(nn.Module):
    """Patch embedding, a stack of `MixerBlock`s, a norm, global average pooling, a classifier.

    Args:
        img_size: Input size; fixed, because token mixing is sized for the token count.
        patch_size: Patch extent.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` (mean of the tokens) or `` (no pooling: `forward` returns tokens).
        embed_dim: Token width (the paper's hidden size C).
        depth: Number of Mixer blocks.
        mlp_ratio: Token- and channel-mixing hidden widths relative to `embed_dim`.
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout inside the MLPs.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
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
        global_pool: str = "avg",
        embed_dim: int = 512,
        depth: int = 8,
        mlp_ratio: float | Sequence[float] = (0.5, 4.0),
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        _check_pool(global_pool)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.spatial_dims = 2
        self.in_chans = in_chans

        self.stem = PatchEmbed(2, img_size, patch_size, in_chans, embed_dim)
        self.img_size = self.stem.img_size
        self.patch_size = self.stem.patch_size
        self.grid_size = self.stem.grid_size
        if freeze_patch_embed:
            self.stem.requires_grad_(False)
        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *[
                MixerBlock(
                    embed_dim,
                    self.stem.num_patches,
                    mlp_ratio,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    drop=proj_drop_rate,
                    drop_path=dpr[i],
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # the reference JAX initialisation: Xavier MLPs with near-zero biases, zero classifier
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name == "head":
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)
                else:
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.normal_(m.bias, std=1e-6)
        proj = self.stem.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=fan_in**-0.5)
        nn.init.zeros_(proj.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block and the final norm, `(B, N, D)`."""
        return self.norm(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average the tokens and classify (or return the pooled vector with `pre_logits`)."""
        if self.global_pool == "avg":
            x = x.mean(dim=1)
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
        """Outputs of selected blocks, as `(B, D, H', W')` maps or `(B, N, D)` tokens.

        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Input `(B, C, H, W)`.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        final_norm = self.norm if norm else None
        x, feats = collect_intermediates(
            self.blocks,
            self.stem(x),
            take,
            last,
            lambda y: format_intermediate(y, self.grid_size, output_fmt, final_norm),
        )
        if intermediates_only:
            return feats
        return self.norm(x), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling); 0 removes it."""
        if global_pool is not None:
            self.global_pool = _check_pool(global_pool)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


# -- registered variants ---------------------------------------------------------------
# Table 1 of the paper: hidden size C, depth; token/channel MLP widths are C/2 and 4C.
_SIZES = {
    "s": dict(embed_dim=512, depth=8),
    "b": dict(embed_dim=768, depth=12),
    "l": dict(embed_dim=1024, depth=24),
}


@register_model
def mixer_s16_224(**kwargs: Any) -> MlpMixer:
    """Mixer-S/16, 224 px (Tolstikhin et al., 2021)."""
    return MlpMixer(**{**dict(patch_size=16, **_SIZES["s"]), **kwargs})


@register_model
def mixer_s32_224(**kwargs: Any) -> MlpMixer:
    """Mixer-S/32, 224 px (Tolstikhin et al., 2021)."""
    return MlpMixer(**{**dict(patch_size=32, **_SIZES["s"]), **kwargs})


@register_model
def mixer_b16_224(**kwargs: Any) -> MlpMixer:
    """Mixer-B/16, 224 px (Tolstikhin et al., 2021)."""
    return MlpMixer(**{**dict(patch_size=16, **_SIZES["b"]), **kwargs})


@register_model
def mixer_b32_224(**kwargs: Any) -> MlpMixer:
    """Mixer-B/32, 224 px (Tolstikhin et al., 2021)."""
    return MlpMixer(**{**dict(patch_size=32, **_SIZES["b"]), **kwargs})


@register_model
def mixer_l16_224(**kwargs: Any) -> MlpMixer:
    """Mixer-L/16, 224 px (Tolstikhin et al., 2021)."""
    return MlpMixer(**{**dict(patch_size=16, **_SIZES["l"]), **kwargs})


@register_model
def mixer_l32_224(**kwargs: Any) -> MlpMixer:
    """Mixer-L/32, 224 px (Tolstikhin et al., 2021)."""
    return MlpMixer(**{**dict(patch_size=32, **_SIZES["l"]), **kwargs})
