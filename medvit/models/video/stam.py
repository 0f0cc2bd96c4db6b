"""STAM: a spatial ViT per frame, then a temporal transformer over the frames' class tokens.

Sharir et al., "An Image is Worth 16x16 Words, What is a Video Worth?", 2021.

Every frame goes through the same spatial ViT (its own class token and position table);
the frames' class tokens, plus a temporal class token and a learned temporal position
embedding, go through a small transformer (6 blocks in the paper) whose class token is
classified. Input `(B, C, T, H, W)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, drop_path_schedule
from medvit.layers.attention_capture import attention_layout
from medvit.models._features import check_output_fmt
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class STAM(nn.Module):
    """Space-time attention model: per-frame ViT + temporal transformer.

    Args:
        img_size: Frame size `(H, W)`.
        patch_size: Patch extent of the spatial ViT.
        num_frames: Frames per clip (fixes the temporal position table).
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        embed_dim: Width of the spatial ViT and of the temporal transformer.
        depth: Spatial ViT blocks.
        num_heads: Spatial ViT heads.
        temporal_depth: Temporal transformer blocks.
        temporal_heads: Temporal transformer heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the q/k/v projections.
        drop_rate: Dropout before the classifier.
        drop_path_rate: Stochastic depth of the last block of each transformer.
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        num_frames: int = 16,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        temporal_depth: int = 6,
        temporal_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if temporal_depth < 1:
            raise ValueError(f"temporal_depth must be >= 1, got {temporal_depth}")
        self.spatial = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, freeze_patch_embed=freeze_patch_embed,
        )
        self.in_chans = in_chans
        self.img_size = self.spatial.img_size
        self.num_frames = num_frames
        self.spatial_dims = 2
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_frames + 1, embed_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        dpr = drop_path_schedule(drop_path_rate, temporal_depth)
        self.temporal_blocks = nn.Sequential(*[
            Block(embed_dim, temporal_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  norm_layer=norm_layer)
            for i in range(temporal_depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.temporal_blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[2] != self.num_frames:
            raise ValueError(
                f"expected input (B, C, {self.num_frames}, H, W), got {tuple(x.shape)}"
            )

    def frame_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Class tokens of every frame after the spatial ViT, `(B, T, D)`."""
        self._check(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        with attention_layout(axes=(1, 2)):  # one frame per sequence
            cls = self.spatial.forward_head(self.spatial.forward_features(frames), pre_logits=True)
        return cls.reshape(b, t, -1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Temporal tokens (class token first) after the temporal transformer, `(B, 1 + T, D)`."""
        x = self.frame_tokens(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        with attention_layout(axes=(0,)):
            return self.norm(self.temporal_blocks(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])
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
        """Per-block patch-token maps of the spatial ViT, over all frames.

        Args:
            x: Input `(B, C, T, H, W)`.
            indices: Spatial blocks to return: None = all, n = the last n, or a list.
            norm: Apply the spatial ViT's final norm to each intermediate.
            output_fmt: `NCHW` gives `(B, D, T, H', W')`; `NLC` gives `(B, T*H'*W', D)`.
            intermediates_only: Return only the list.
            stop_early: Stop after the last requested block (only with `intermediates_only`).

        Returns:
            The intermediates, or `(temporal_tokens, intermediates)` where the first is what
            `forward_features` returns.
        """
        check_output_fmt(output_fmt)
        self._check(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        out = self.spatial.forward_intermediates(
            frames, indices, norm=norm, output_fmt="NCHW", intermediates_only=intermediates_only,
            stop_early=stop_early,
        )
        maps = out if intermediates_only else out[1]
        feats = []
        for y in maps:
            y = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
            feats.append(y.flatten(2).transpose(1, 2) if output_fmt == "NLC" else y)
        if intermediates_only:
            return feats
        cls = self.spatial.forward_head(out[0], pre_logits=True).reshape(b, t, -1)
        z = torch.cat((self.cls_token.expand(b, -1, -1), cls), dim=1) + self.pos_embed
        return self.norm(self.temporal_blocks(z)), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier; 0 removes it. Pooling is always the temporal class token."""
        if global_pool not in (None, "token"):
            raise ValueError(f"STAM pools with its temporal class token; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()


@register_model
def stam_base_patch16_224_16f(**kwargs: Any) -> STAM:
    """STAM_16: ViT-B/16 per 224 px frame, 16 frames, 6 temporal blocks (Sharir et al., 2021)."""
    return STAM(**{**dict(num_frames=16), **kwargs})
