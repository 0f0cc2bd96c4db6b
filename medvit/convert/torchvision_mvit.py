"""Load torchvision's video MViT v1 (`torchvision.models.video.mvit_v1_b`) weights.

torchvision and medvit compute the same network; only names (and the vector shapes of the
class token and class position) differ.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from medvit.convert._common import StateDict, load_strict, unwrap

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


def map_torchvision_mvit(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """torchvision `mvit_v1_b` keys -> `MViTVideo` keys."""
    out: StateDict = {}
    for k, v in unwrap(state_dict).items():
        for pattern, repl in _RENAMES:
            k = re.sub(pattern, repl, k)
        if k in ("pos_embed_spatial", "pos_embed_temporal"):
            v = v.unsqueeze(0)
        elif k in ("cls_token", "pos_embed_class"):
            v = v.reshape(1, 1, -1)
        out[k] = v
    return out


def load_torchvision_mvit(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a torchvision video MViT v1 state dict into an `MViTVideo`, strictly."""
    return load_strict(model, map_torchvision_mvit(state_dict), "torchvision MViT")
