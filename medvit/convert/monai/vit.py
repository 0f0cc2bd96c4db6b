"""MONAI `ViT` state dict -> medvit `VisionTransformer` (also UNETR's encoder)."""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed, rename_first
from medvit.convert.monai import register_monai_mapper
from medvit.models.image.vit import VisionTransformer

# MONAI ViT key -> medvit ViT key (applied in order, first match wins).
_VIT_RULES = [
    (r"^patch_embedding\.position_embeddings$", "pos_embed"),
    (r"^patch_embedding\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^patch_embedding\.patch_embeddings\.1\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^blocks\.(\d+)\.mlp\.linear1\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.linear2\.", r"blocks.\1.mlp.fc2."),
    (r"^blocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^classification_head\.(weight|bias)$", r"head.\1"),
]


@register_monai_mapper(VisionTransformer, "MONAI ViT")
def map_vit(sd: StateDict, model: nn.Module) -> StateDict:
    """Rename a MONAI ViT state dict for `model`, reshaping a perceptron patch embedding and
    fitting the position table to the model's grid.

    Raises:
        ValueError: The checkpoint has a Tanh post-activation head.
    """
    out: StateDict = {}
    for k, v in sd.items():
        if re.match(r"^blocks\.\d+\.norm_cross_attn\.", k):
            continue  # created by MONAI's TransformerBlock but unused without cross-attention
        if k.startswith("classification_head.0."):
            raise ValueError(
                "MONAI ViT with a Tanh post-activation head has no medvit equivalent "
                "(build it with post_activation=None, or load with the head dropped)"
            )
        if k == "patch_embedding.patch_embeddings.1.weight":
            # perceptron patch embedding: Linear over (p1 p2 p3 c) -> conv kernel (c, p1, p2, p3)
            p = model.patch_size
            v = v.reshape(v.shape[0], *p, -1).movedim(-1, 1).contiguous()
        out[rename_first(k, _VIT_RULES)] = v
    if "pos_embed" in out and isinstance(model.pos_embed, nn.Parameter):
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        out["pos_embed"] = fit_pos_embed(out["pos_embed"], model.grid_size, prefix)
    return out
