"""timm MViTv2: names match except the classifier (`head.fc` -> `head`)."""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.mvitv2 import MultiScaleVit


@register_timm_mapper(MultiScaleVit)
def _map_mvitv2(sd: StateDict, model: nn.Module) -> StateDict:
    if "cls_token" in sd:
        raise ValueError("timm MViTv2 variants with a class token (*_cls) are not supported")
    return {("head." + k[len("head.fc."):] if k.startswith("head.fc.") else k): v for k, v in sd.items()}
