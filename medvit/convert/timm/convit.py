"""timm ConViT: the parameter names already match; fit the position table to the grid."""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.convit import ConViT


@register_timm_mapper(ConViT)
def _map_convit(sd: StateDict, model: nn.Module) -> StateDict:
    if "pos_embed" in sd:
        # the table covers the patch tokens only; the class token joins after the GPSA blocks
        sd["pos_embed"] = fit_pos_embed(sd["pos_embed"], model.grid_size, 0)
    return sd
