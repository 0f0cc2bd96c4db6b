"""Initialise video models from 2D image checkpoints of the same width ("inflation").

Each video family registers how its weights are built from an image state dict with
`register_inflater`; every module in this package is imported, so a family adds a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from medvit.convert._common import MapperRegistry, StateDict, import_family_modules

Inflater = Callable[[StateDict, nn.Module, str], StateDict]
_INFLATERS: MapperRegistry[Inflater] = MapperRegistry(
    "inflated image", "no image-to-video inflation is known for {}"
)


def register_inflater(cls: type) -> Callable[[Inflater], Inflater]:
    """Register the function mapping an image state dict onto video models of class `cls`."""
    return _INFLATERS.register(cls)


def inflate_image_to_video(
    video_model: nn.Module, image_state_dict: Mapping[str, torch.Tensor], tubelet_init: str = "central"
) -> nn.Module:
    """Load a 2D image checkpoint (e.g. a medvit or timm ViT) into a video model.

    As the papers do: position embeddings repeated over time, tubelet kernels initialised
    from the 2D kernel (`central`: the 2D kernel in the central frame, zeros elsewhere;
    `average`: the 2D kernel divided by the tubelet length in every frame), and temporal
    parts initialised so the model starts as the image model applied frame by frame.

    Args:
        video_model: The video model to fill (modified in place).
        image_state_dict: The image model's weights.
        tubelet_init: `central` or `average`.

    Returns:
        The video model.

    Raises:
        ValueError: No inflation is known for this model, or the widths do not fit.
    """
    if tubelet_init not in ("central", "average"):
        raise ValueError(f"tubelet_init must be 'central' or 'average', got {tubelet_init!r}")
    return _INFLATERS.load(video_model, image_state_dict, tubelet_init)


import_family_modules(__name__, __path__)
