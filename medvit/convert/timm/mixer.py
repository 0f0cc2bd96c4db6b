"""timm MLP-Mixer: the parameter names already match.

The token-mixing MLP is sized for the token count, so unlike ViT a checkpoint trained at
another resolution cannot be resampled; the strict loader reports the shape mismatch.
"""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.mixer import MlpMixer


@register_timm_mapper(MlpMixer)
def _map_mixer(sd: StateDict, model: nn.Module) -> StateDict:
    if "stem.norm.weight" in sd:
        raise ValueError("timm MLP-Mixers with a stem norm (stem_norm=True) are not supported")
    return sd
