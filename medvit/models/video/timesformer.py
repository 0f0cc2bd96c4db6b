"""TimeSformer: a ViT applied to the frames of a clip, with space-time self-attention.

Bertasius et al., "Is Space-Time Attention All You Need for Video Understanding?",
ICML 2021.

Frames are embedded by the image patch embedding, get the learned spatial position
embedding plus a learned temporal embedding, and pass through blocks whose attention is
chosen by `attention_type`: `space` (frames independent), `joint` (all tokens of the
clip), `divided` (temporal then spatial attention, the paper's default), `sparse`
(local-global: windows of all frames x a quarter of the frame, then a global attention
over tokens 2 apart in time, height and width) or `axial` (time, then width, then height).
Parameter names follow the official code (`temporal_norm1`, `temporal_attn`,
`temporal_fc`, `time_embed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block
from medvit.layers.video_attention import GROUPINGS, FactorisedSpaceTimeBlock, check_grouping
from medvit.models._features import collect_intermediates, feature_take_last, format_intermediate
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model

# (steps before the last, last grouping) of each factorised scheme.
_FACTORISED = {
    "divided": ((("temporal", GROUPINGS["time"]),), GROUPINGS["space"]),
    "sparse": ((("local", GROUPINGS["local"]),), GROUPINGS["global"]),
    "axial": (
        (("temporal", GROUPINGS["time"]), ("width", GROUPINGS["width"])),
        GROUPINGS["height"],
    ),
}
ATTENTION_TYPES = ("space", "joint", *_FACTORISED)


class TimeSformer(VisionTransformer):
    """ViT over the frames of a clip `(B, C, T, H, W)` with selectable space-time attention.

    With `space` attention every frame keeps its own class token and the final tokens are
    averaged over time (as the official code); otherwise one class token serves the clip.

    Args:
        img_size: Frame size `(H, W)`.
        patch_size: Patch extent (frame-wise 2D patches).
        in_chans: Input channels.
        num_frames: Clip length T.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token` or `avg`.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the q/k/v projections.
        attention_type: One of `ATTENTION_TYPES`.
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding the position embeddings.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
        norm_eps: LayerNorm epsilon.
        act_layer: MLP activation.
        freeze_patch_embed: Keep the patch projection fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_frames: int = 8,
        num_classes: int = 400,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attention_type: str = "divided",
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if attention_type in _FACTORISED:
            steps, final = _FACTORISED[attention_type]
            block_fn: Callable[..., nn.Module] = partial(FactorisedSpaceTimeBlock, steps=steps, final=final)
        else:
            block_fn = Block
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
            fc_norm=False,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            act_layer=act_layer,
            spatial_dims=2,
            freeze_patch_embed=freeze_patch_embed,
            block_fn=block_fn,
        )
        self.attention_type = attention_type
        self.num_frames = num_frames
        self.token_grid = (num_frames, *self.grid_size)
        if attention_type in _FACTORISED:
            steps, final = _FACTORISED[attention_type]
            for _, grouping in (*steps, ("", final)):
                try:
                    check_grouping(self.token_grid, grouping)
                except ValueError as e:
                    raise ValueError(
                        f"{attention_type} attention cannot cut the (frames, height, width) "
                        f"token grid {self.token_grid}: {e}"
                    ) from None
        # `space` attention never mixes frames, so it has no temporal embedding (as the paper)
        self.time_embed = (
            nn.Parameter(torch.zeros(1, num_frames, embed_dim)) if attention_type != "space" else None
        )
        # The temporal residuals start at zero so training starts from the image model per frame.
        for blk in self.blocks:
            if isinstance(blk, FactorisedSpaceTimeBlock):
                for fc in blk.step_fcs():
                    nn.init.zeros_(fc.weight)
                    nn.init.zeros_(fc.bias)

    # -- embedding ---------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Tokens with class token and embeddings, and the `(T, H', W')` patch grid.

        Returns `(B, 1 + T*N, D)` in (t, h, w) order, or for `space` attention
        `(B*T, 1 + N, D)` (one class token per frame).
        """
        if x.ndim != 5:
            raise ValueError(f"expected a clip (B, C, T, H, W), got shape {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        if t != self.num_frames:
            raise ValueError(f"clip has {t} frames, the model was built for num_frames={self.num_frames}")
        x = self.patch_embed(x.transpose(1, 2).reshape(b * t, c, h, w))
        cls = self.cls_token + self.pos_embed[:, :1]
        x = x + self.pos_embed[:, 1:]
        if self.time_embed is None:
            x = torch.cat([cls.expand(b * t, -1, -1), x], dim=1)
        else:
            x = x.reshape(b, t, -1, self.embed_dim) + self.time_embed.unsqueeze(2)
            x = torch.cat([cls.expand(b, -1, -1), x.reshape(b, -1, self.embed_dim)], dim=1)
        return self.pos_drop(x), self.token_grid

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return blk(x, self.token_grid) if isinstance(blk, FactorisedSpaceTimeBlock) else blk(x)

    def _clip_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, 1 + T*N, D)` from the per-frame tokens of `space` attention (class token averaged)."""
        if self.time_embed is not None:
            return x
        t = self.num_frames
        x = x.reshape(-1, t, x.shape[1], x.shape[2])
        return torch.cat([x[:, :, 0].mean(dim=1, keepdim=True), x[:, :, 1:].flatten(1, 2)], dim=1)

    # -- common interface ----------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block and the final norm, `(B, 1 + T*N, D)` in (t, h, w) order.

        With `space` attention the class token is the mean of the frames' class tokens.
        """
        x, _ = self.embed(x)
        for blk in self.blocks:
            x = self._block(blk, x)
        return self._clip_tokens(self.norm(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Patch tokens of selected blocks.

        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Clip `(B, C, T, H, W)`.
            output_fmt: `NCHW` (maps `(B, D, T, H', W')`) or `NLC` (`(B, T*H'*W', D)`,
                (t, h, w) order); the class token is removed.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        x, grid = self.embed(x)
        x, feats = collect_intermediates(
            self.blocks,
            x,
            take,
            last,
            lambda y: format_intermediate(
                self._clip_tokens(self.norm(y) if norm else y), grid, output_fmt, num_prefix_tokens=1
            ),
            step=self._block,
        )
        if intermediates_only:
            return feats
        return self._clip_tokens(self.norm(x)), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier (and optionally the pooling, `token` or `avg`); 0 removes it."""
        if global_pool is not None and global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        super().reset_classifier(num_classes, global_pool)


# -- registered variants ---------------------------------------------------------------
# The paper's three Kinetics-400 models: ViT-B/16 with divided space-time attention.


@register_model
def timesformer_base(**kwargs: Any) -> TimeSformer:
    """TimeSformer: ViT-B/16, divided attention, 8 frames of 224 px (Bertasius et al., 2021)."""
    return TimeSformer(**{**dict(num_frames=8, img_size=224), **kwargs})


@register_model
def timesformer_hr(**kwargs: Any) -> TimeSformer:
    """TimeSformer-HR: ViT-B/16, divided attention, 16 frames of 448 px (Bertasius et al., 2021)."""
    return TimeSformer(**{**dict(num_frames=16, img_size=448), **kwargs})


@register_model
def timesformer_l(**kwargs: Any) -> TimeSformer:
    """TimeSformer-L: ViT-B/16, divided attention, 96 frames of 224 px (Bertasius et al., 2021)."""
    return TimeSformer(**{**dict(num_frames=96, img_size=224), **kwargs})
