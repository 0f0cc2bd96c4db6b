"""timm XCiT: LayerScale `gamma1/2/3` become `ls1/ls2/ls3.gamma`; all other names match."""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.xcit import Xcit

_GAMMA = re.compile(r"^((?:cls_attn_)?blocks\.\d+)\.gamma(\d)$")


@register_timm_mapper(Xcit)
def _map_xcit(sd: StateDict, model: nn.Module) -> StateDict:
    # the Fourier position encoding is computed for any grid: nothing to resample
    return {_GAMMA.sub(r"\1.ls\2.gamma", k): v for k, v in sd.items()}
