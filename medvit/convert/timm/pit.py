"""timm PiT: the parameter names already match (original checkpoints' `pools.i` renamed)."""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.pit import PoolingVisionTransformer

_POOLS = re.compile(r"^pools\.(\d+)\.")


@register_timm_mapper(PoolingVisionTransformer)
def _map_pit(sd: StateDict, model: nn.Module) -> StateDict:
    # naver-ai's release keeps the pooling layers in a separate `pools` list
    return {_POOLS.sub(lambda m: f"transformers.{int(m.group(1)) + 1}.pool.", k): v for k, v in sd.items()}
