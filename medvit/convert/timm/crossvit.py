"""timm CrossViT: fusion attention's wq/wk/wv to q/k/v; fit each branch's position table."""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.crossvit import CrossViT

# the fusion uses the shared ClassAttn, whose projections are named q, k, v
_FUSION_QKV = re.compile(r"^(blocks\.\d+\.fusion\.\d+\.(?:\d+\.)?attn)\.w([qkv])\.")


@register_timm_mapper(CrossViT)
def _map_crossvit(sd: StateDict, model: nn.Module) -> StateDict:
    out = {_FUSION_QKV.sub(r"\1.\2.", k): v for k, v in sd.items()}
    for i, grid in enumerate(model.grid_sizes):
        key = f"pos_embed_{i}"
        if key in out:
            out[key] = fit_pos_embed(out[key], grid, 1)
    return out
