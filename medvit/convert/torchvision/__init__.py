"""Load torchvision state dicts into the medvit model of the same architecture.

One module per model family in this package registers its mapper with
`register_torchvision_mapper`; every public module here is imported, so a new family only
adds a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from medvit.convert._common import Mapper, MapperRegistry, import_family_modules

_MAPPERS: MapperRegistry[Mapper] = MapperRegistry(
    "torchvision", "load_torchvision does not know how to load into {}"
)


def register_torchvision_mapper(cls: type, checkpoint: str) -> Callable[[Mapper], Mapper]:
    """Register the function that maps a torchvision state dict for models of class `cls`.

    Args:
        cls: The medvit model class.
        checkpoint: The torchvision model it reads, as load errors name it (`torchvision MViT`).
    """
    return _MAPPERS.register(cls, checkpoint)


def load_torchvision(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a torchvision state dict, strictly, into a medvit model of the same architecture.

    Args:
        model: The medvit model (e.g. an `MViTVideo` for `mvit_v1_b` weights).
        state_dict: torchvision's `model.state_dict()` or a checkpoint's weights.

    Returns:
        The model, loaded in place.

    Raises:
        ValueError: No mapper for this model class, or the weights do not fit.
    """
    return _MAPPERS.load(model, state_dict)


import_family_modules(__name__, __path__)
