"""DeiT: ViT trained on ImageNet-1k alone, and its distillation token.

Touvron et al., "Training data-efficient image transformers & distillation through
attention", ICML 2021.

The plain DeiTs are ViT configurations. The distilled ones add a second prefix token
whose output feeds a second head; in training it is fit to a teacher's predictions
(`medvit.losses.HardDistillationLoss`), and at inference the two heads are averaged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from medvit.layers import resample_pos_embed
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class VisionTransformerDistilled(VisionTransformer):
    """ViT with a distillation token after the class token and a distillation head.

    Both prefix tokens have position embeddings (unless `no_embed_class`). `forward`
    averages the two heads' logits, except in training with `distilled_training` set,
    where it returns `(cls_logits, dist_logits)` for the distillation loss.

    Args:
        global_pool: Must be `token`: the heads read the class and distillation tokens.
        **kwargs: The arguments of `VisionTransformer`.
    """

    def __init__(self, global_pool: str = "token", **kwargs: Any) -> None:
        if global_pool != "token":
            raise ValueError(
                f"the distilled ViT reads its class and distillation tokens: global_pool must be"
                f" 'token', got {global_pool!r}"
            )
        super().__init__(global_pool=global_pool, **kwargs)
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.pos_embed is not None and not self.no_embed_class:
            # ViT built its table for one prefix token; the distillation token needs a row too
            n_pos = self.pos_embed.shape[1] + 1
            if isinstance(self.pos_embed, nn.Parameter):
                self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, self.embed_dim))
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            else:  # fixed sin-cos: prefix tokens get zero rows
                zero = self.pos_embed.new_zeros(1, 1, self.embed_dim)
                table = torch.cat([zero, self.pos_embed], dim=1)
                self.register_buffer("pos_embed", table, persistent=False)
        self.head_dist = self._linear_head(self.num_classes)
        self.distilled_training = False

    def _linear_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def set_distilled_training(self, enable: bool = True) -> None:
        """Return both heads' logits in training (for the distillation loss) instead of their mean."""
        self.distilled_training = enable

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        pos = self.pos_embed
        if pos is not None and grid != self.grid_size:
            prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            pos = resample_pos_embed(pos, grid, self.grid_size, num_prefix_tokens=prefix)
        tokens = torch.cat([self.cls_token, self.dist_token], dim=1).expand(x.shape[0], -1, -1)
        if self.no_embed_class:
            x = torch.cat([tokens, x if pos is None else x + pos], dim=1)
        else:
            x = torch.cat([tokens, x], dim=1)
            if pos is not None:
                x = x + pos
        return self.pos_drop(x)

    def forward_head(
        self, x: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits from the two prefix tokens: averaged, or both in distilled training.

        With `pre_logits`, the mean of the two (dropped-out) token vectors.
        """
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training:
            return x, x_dist
        return (x + x_dist) / 2

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace both heads; 0 removes them (the model then returns the averaged tokens)."""
        if global_pool not in (None, "token"):
            raise ValueError(
                f"the distilled ViT reads its class and distillation tokens: global_pool must be"
                f" 'token', got {global_pool!r}"
            )
        self.num_classes = num_classes
        self.head = self._linear_head(num_classes)
        self.head_dist = self._linear_head(num_classes)


# -- registered variants ---------------------------------------------------------------
# DeiT's Table 1: Ti, S, B share ViT-B's depth and head width (64), differing in heads.
_DEIT = dict(img_size=224, patch_size=16, depth=12)


@register_model
def deit_tiny_patch16_224(**kwargs: Any) -> VisionTransformer:
    """DeiT-Ti/16, width 192, 3 heads, 224 px (Touvron et al., 2021)."""
    return VisionTransformer(**{**_DEIT, **dict(embed_dim=192, num_heads=3), **kwargs})


@register_model
def deit_small_patch16_224(**kwargs: Any) -> VisionTransformer:
    """DeiT-S/16, width 384, 6 heads, 224 px (Touvron et al., 2021)."""
    return VisionTransformer(**{**_DEIT, **dict(embed_dim=384, num_heads=6), **kwargs})


@register_model
def deit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
    """DeiT-B/16, width 768, 12 heads, 224 px (Touvron et al., 2021)."""
    return VisionTransformer(**{**_DEIT, **dict(embed_dim=768, num_heads=12), **kwargs})


@register_model
def deit_tiny_distilled_patch16_224(**kwargs: Any) -> VisionTransformerDistilled:
    """DeiT-Ti/16 with a distillation token, width 192, 3 heads, 224 px (Touvron et al., 2021)."""
    return VisionTransformerDistilled(**{**_DEIT, **dict(embed_dim=192, num_heads=3), **kwargs})


@register_model
def deit_small_distilled_patch16_224(**kwargs: Any) -> VisionTransformerDistilled:
    """DeiT-S/16 with a distillation token, width 384, 6 heads, 224 px (Touvron et al., 2021)."""
    return VisionTransformerDistilled(**{**_DEIT, **dict(embed_dim=384, num_heads=6), **kwargs})


@register_model
def deit_base_distilled_patch16_224(**kwargs: Any) -> VisionTransformerDistilled:
    """DeiT-B/16 with a distillation token, width 768, 12 heads, 224 px (Touvron et al., 2021)."""
    return VisionTransformerDistilled(**{**_DEIT, **dict(embed_dim=768, num_heads=12), **kwargs})
