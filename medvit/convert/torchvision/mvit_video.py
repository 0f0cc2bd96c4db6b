"""torchvision's video MViT v1 (`torchvision.models.video.mvit_v1_b`) -> medvit `MViTVideo`.

torchvision and medvit compute the same network; only names (and the vector shapes of the
class token and class position) differ.
"""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.torchvision import register_torchvision_mapper
from medvit.models.video.mvit_video import MViTVideo

_RENAMES = (
    (r"^conv_proj\.", "patch_embed.proj."),
    (r"^pos_encoding\.spatial_pos$", "pos_embed_spatial"),
    (r"^pos_encoding\.temporal_pos$", "pos_embed_temporal"),
    (r"^pos_encoding\.class_pos$", "pos_embed_class"),
    (r"^pos_encoding\.class_token$", "cls_token"),
    (r"\.attn\.project\.0\.", ".attn.proj."),
    (r"\.attn\.pool_(q|k|v)\.pool\.", r".attn.pool_\1."),
    (r"\.attn\.pool_(q|k|v)\.norm_act\.0\.", r".attn.norm_\1."),
    (r"\.mlp\.0\.", ".mlp.fc1."),
    (r"\.mlp\.3\.", ".mlp.fc2."),
    (r"^(blocks\.\d+)\.project\.", r"\1.shortcut_proj_mlp."),
    (r"^head\.1\.", "head."),
)


@register_torchvision_mapper(MViTVideo, "torchvision MViT")
def map_mvit_video(sd: StateDict, model: nn.Module) -> StateDict:
    """torchvision `mvit_v1_b` keys -> `MViTVideo` keys."""
    out: StateDict = {}
    for k, v in sd.items():
        for pattern, repl in _RENAMES:
            k = re.sub(pattern, repl, k)
        if k in ("pos_embed_spatial", "pos_embed_temporal"):
            v = v.unsqueeze(0)
        elif k in ("cls_token", "pos_embed_class"):
            v = v.reshape(1, 1, -1)
        out[k] = v
    return out

