"""Initialise video models from 2D image checkpoints of the same width ("inflation").

Each video family registers how its weights are built from an image state dict with
`register_inflater`; every module in this package is imported, so a family adds a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from medvit.convert._common import StateDict, load_strict, unwrap

Inflater = Callable[[StateDict, nn.Module, str], StateDict]
_INFLATERS: dict[type, Inflater] = {}


def register_inflater(cls: type) -> Callable[[Inflater], Inflater]:
    """Register the function mapping an image state dict onto video models of class `cls`."""

    def wrap(fn: Inflater) -> Inflater:
        _INFLATERS[cls] = fn
        return fn

    return wrap


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
    fn = next((_INFLATERS[c] for c in type(video_model).__mro__ if c in _INFLATERS), None)
    if fn is None:
        raise ValueError(f"no image-to-video inflation is known for {type(video_model).__name__}")
    sd = fn(unwrap(image_state_dict), video_model, tubelet_init)
    return load_strict(video_model, sd, "inflated image")


for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")
