"""timm ViT: the parameter names already match; fit the position table to the grid."""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.vit import VisionTransformer


@register_timm_mapper(VisionTransformer)
def _map_vit(sd: StateDict, model: nn.Module) -> StateDict:
    if any(k == "reg_token" for k in sd):
        raise ValueError("timm ViTs with register tokens are not supported")
    if "pos_embed" in sd and isinstance(model.pos_embed, nn.Parameter):
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd["pos_embed"] = fit_pos_embed(sd["pos_embed"], model.grid_size, prefix)
    return sd
