"""timm ConvMixer: its `nn.Sequential` indices become the named layers of our blocks."""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict
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


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


@register_timm_mapper(ConvMixer)
def _map_convmixer(sd: StateDict, model: nn.Module) -> StateDict:
    return {_rename(k): v for k, v in sd.items()}
