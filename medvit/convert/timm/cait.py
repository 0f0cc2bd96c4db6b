"""timm CaiT: LayerScale `gamma_1/2` become `ls1/ls2.gamma`; fit the position table to the grid."""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.cait import Cait

_GAMMA = re.compile(r"^(blocks(?:_token_only)?\.\d+)\.gamma_(\d)$")


@register_timm_mapper(Cait)
def _map_cait(sd: StateDict, model: nn.Module) -> StateDict:
    out = {_GAMMA.sub(r"\1.ls\2.gamma", k): v for k, v in sd.items()}
    if "pos_embed" in out:
        # CaiT's table covers only the patch tokens: the class token never gets one
        out["pos_embed"] = fit_pos_embed(out["pos_embed"], model.grid_size, 0)
    return out
