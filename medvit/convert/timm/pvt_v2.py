"""timm PVT v2 (and so SegFormer's MiT): timm's parameter names are ours.

Checkpoints in the original PVT v2 / SegFormer layout (`patch_embed1`, `block1.0`,
`norm1`, `dwconv.dwconv`) are renamed the way timm's own filter does.
"""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.pvt_v2 import PyramidVisionTransformerV2


def _from_original(key: str) -> str:
    key = re.sub(r"^patch_embed1\.", "patch_embed.", key)
    key = re.sub(r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample.", key)
    key = key.replace("dwconv.dwconv", "dwconv")
    key = re.sub(r"^block(\d+)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.", key)
    return re.sub(r"^norm(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.norm.", key)


@register_timm_mapper(PyramidVisionTransformerV2)
def _map_pvt_v2(sd: StateDict, model: nn.Module) -> StateDict:
    if "patch_embed1.proj.weight" in sd:
        return {_from_original(k): v for k, v in sd.items()}
    return dict(sd)
