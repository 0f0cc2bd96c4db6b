"""STAM from an image ViT: the spatial ViT takes the image weights as they are.

The temporal transformer has no image counterpart and keeps the video model's own
initialisation; the image classifier, if any, is dropped (STAM's spatial ViT has none).
"""

from __future__ import annotations

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.inflate import register_inflater
from medvit.models.video.stam import STAM


@register_inflater(STAM)
def inflate_stam(image_state_dict: StateDict, video_model: nn.Module, tubelet_init: str) -> StateDict:
    """Image ViT weights under `spatial.`, every other tensor from `video_model` itself.

    `tubelet_init` has no effect: STAM embeds every frame with the 2D patch projection.
    """
    sd = {k: v for k, v in video_model.state_dict().items() if not k.startswith("spatial.")}
    for k, v in image_state_dict.items():
        if not k.startswith("head."):
            sd[f"spatial.{k}"] = v
    return sd
