"""timm Swin Transformer: names match except the classifier (`head.fc` -> `head`)."""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.swin import SwinTransformer

# timm's buffers (recomputed here from the window size) in checkpoints saved by older versions
_DERIVED = ("relative_position_index", "attn_mask", "relative_coords_table")


@register_timm_mapper(SwinTransformer)
def _map_swin(sd: StateDict, model: nn.Module) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        if k.rsplit(".", 1)[-1] in _DERIVED:
            continue
        if k.startswith("head.fc."):
            k = "head." + k[len("head.fc.") :]
        out[k] = v
    return out
