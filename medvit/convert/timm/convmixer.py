"""timm ConvMixer: its `nn.Sequential` indices become the named layers of our blocks."""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict, rename_first
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.convmixer import ConvMixer

# timm: stem = (conv, act, bn); block = (Residual(conv_dw, act, bn), conv_pw, act, bn)
_RENAMES = [
    (r"^stem\.0\.", "stem.proj."),
    (r"^stem\.2\.", "stem.norm."),
    (r"^blocks\.(\d+)\.0\.fn\.0\.", r"blocks.\1.conv_dw."),
    (r"^blocks\.(\d+)\.0\.fn\.2\.", r"blocks.\1.norm_dw."),
    (r"^blocks\.(\d+)\.1\.", r"blocks.\1.conv_pw."),
    (r"^blocks\.(\d+)\.3\.", r"blocks.\1.norm_pw."),
]


@register_timm_mapper(ConvMixer)
def _map_convmixer(sd: StateDict, model: nn.Module) -> StateDict:
    return {rename_first(k, _RENAMES): v for k, v in sd.items()}
