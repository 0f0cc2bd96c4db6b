"""VTN: any 2D backbone per frame, then a Longformer-style temporal encoder.

Neimark et al., "Video Transformer Network", ICCV Workshops 2021.

Each frame is encoded by a registered 2D backbone (its pooled features); the frame
embeddings, with a learned temporal position embedding and a global [CLS] token in front,
go through transformer blocks whose attention is local over frames (a window of
`2 * window_size + 1` frames, realised as an attention mask) while [CLS] attends to, and
is attended by, every frame. An MLP head classifies [CLS]. Input `(B, C, T, H, W)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Block, Mlp, drop_path_schedule
from medvit.layers.attention_capture import attention_layout
from medvit.layers.longformer_1d import LongformerAttention1d
from medvit.models._features import collect_intermediates, feature_take_last, format_intermediate
from medvit.registry import register_model


class VTN(nn.Module):
    """Video Transformer Network.

    Args:
        backbone: Registered 2D model name, built with `num_classes=0`.
        backbone_args: Extra arguments of the backbone (e.g. its `embed_dim`).
        img_size: Frame size, passed to the backbone (None: the backbone's default).
        in_chans: Input channels, passed to the backbone (None: the backbone's default).
        num_frames: Frames per clip (fixes the temporal position table).
        num_classes: Classifier outputs; 0 gives the [CLS] features.
        embed_dim: Temporal encoder width; the frame features are projected to it when the
            backbone's width differs.
        depth: Temporal encoder blocks (3 in the paper).
        num_heads: Temporal encoder heads.
        window_size: Half-width of the local attention window over frames.
        mlp_ratio: MLP hidden width of the temporal blocks.
        qkv_bias: Bias of the temporal q/k/v projection.
        drop_rate: Dropout in the MLP head.
        drop_path_rate: Stochastic depth of the last temporal block.
        freeze_patch_embed: Passed to the backbone (MoCo v3).
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_224",
        backbone_args: dict[str, Any] | None = None,
        img_size: int | Sequence[int] | None = None,
        in_chans: int | None = None,
        num_frames: int = 16,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 3,
        num_heads: int = 12,
        window_size: int = 9,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        from medvit.registry import create_model

        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        args = dict(backbone_args or {})
        for key, value in (("img_size", img_size), ("in_chans", in_chans)):
            if value is not None:
                args[key] = value
        if freeze_patch_embed:
            args["freeze_patch_embed"] = True
        self.backbone = create_model(backbone, num_classes=0, **args)
        if getattr(self.backbone, "spatial_dims", 2) != 2 or hasattr(self.backbone, "num_frames"):
            raise ValueError(f"VTN needs a 2D image backbone, got {backbone!r}")
        self.in_chans = self.backbone.in_chans
        self.img_size = tuple(self.backbone.img_size)
        self.num_frames = num_frames
        self.spatial_dims = 2
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        feat_dim = self.backbone.num_features
        self.proj = nn.Linear(feat_dim, embed_dim) if feat_dim != embed_dim else None
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_frames + 1, embed_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        attn = partial(LongformerAttention1d, window_size=window_size, num_global=1)
        dpr = drop_path_schedule(drop_path_rate, depth)
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  norm_layer=norm_layer, attn_layer=attn)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.drop_rate = drop_rate
        self.head = self._make_head(num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _make_head(self, num_classes: int) -> nn.Module:
        # the paper's MLP head: hidden layer of the encoder's width, then the classes
        if num_classes == 0:
            return nn.Identity()
        return Mlp(self.embed_dim, self.embed_dim, num_classes, drop=self.drop_rate)

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of every frame, `(B, T, backbone width)`."""
        if x.ndim != 5 or x.shape[2] != self.num_frames:
            raise ValueError(f"expected input (B, C, {self.num_frames}, H, W), got {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        with attention_layout(axes=(1, 2)):  # one frame per sequence
            f = self.backbone(x.transpose(1, 2).reshape(b * t, c, h, w))
        return f.reshape(b, t, -1)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        f = self.frame_features(x)
        if self.proj is not None:
            f = self.proj(f)
        return torch.cat((self.cls_token.expand(f.shape[0], -1, -1), f), dim=1) + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Temporal tokens ([CLS] first) after the encoder, `(B, 1 + T, D)`."""
        return self.norm(self.blocks(self._tokens(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0]
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
        """Frame tokens after each temporal block ([CLS] removed).

        The backbone pools each frame to a vector, so the maps have no spatial extent:
        `NCHW` gives `(B, D, T, 1, 1)`, `NLC` gives `(B, T, D)`.
        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Input `(B, C, T, H, W)`.
            indices: Temporal blocks to return: None = all, n = the last n, or a list.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        final_norm = self.norm if norm else None
        z, feats = collect_intermediates(
            self.blocks,
            self._tokens(x),
            take,
            last,
            # the frame tokens form a (T, 1, 1) grid
            lambda y: format_intermediate(y, (y.shape[1] - 1, 1, 1), output_fmt, final_norm, 1),
        )
        if intermediates_only:
            return feats
        return self.norm(z), feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the MLP head; 0 removes it. Pooling is always the [CLS] token."""
        if global_pool not in (None, "token"):
            raise ValueError(f"VTN pools with its [CLS] token; got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)


# the paper's ViT-B VTN: ViT-B/16 frames, 3 Longformer layers (width 768, 12 heads), MLP head;
# window_size 9 is the reference config's Longformer attention_window of 18 (9 frames each side)
@register_model
def vtn_vit_base(**kwargs: Any) -> VTN:
    """VTN on ViT-B/16 frames: 3 Longformer layers, window 9, MLP head (Neimark et al., 2021)."""
    return VTN(**{**dict(backbone="vit_base_patch16_224"), **kwargs})
