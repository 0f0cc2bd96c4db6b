"""timm LeViT (linear mode): the parameter names already match; drop the bias index tables."""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.levit import Levit


@register_timm_mapper(Levit)
def _map_levit(sd: StateDict, model: nn.Module) -> StateDict:
    # facebookresearch's checkpoints store the index tables, which the model rebuilds from its grid
    sd = {k: v for k, v in sd.items() if "attention_bias_idxs" not in k}
    if any(v.ndim == 4 and ".blocks." in k for k, v in sd.items()):
        raise ValueError("timm conv-mode LeViT (levit_conv_*) weights do not fit the linear-mode model")
    return sd
