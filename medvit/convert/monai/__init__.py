"""Load MONAI state dicts (`ViT`, `UNETR`, `SwinUNETR`) into the medvit model of the same design.

One module per model family in this package registers its mapper with
`register_monai_mapper`; every public module here is imported, so a new family only adds
a file. `_decoder.py` holds the key rules of the U-Net decoder blocks UNETR and Swin-UNETR
share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from medvit.convert._common import Mapper, MapperRegistry, import_family_modules

_MAPPERS: MapperRegistry[Mapper] = MapperRegistry("MONAI", "load_monai does not know how to load into {}")


def register_monai_mapper(cls: type, checkpoint: str) -> Callable[[Mapper], Mapper]:
    """Register the function that maps a MONAI state dict for models of class `cls`.

    Args:
        cls: The medvit model class.
        checkpoint: The MONAI network it reads, as load errors name it (`MONAI UNETR`).
    """
    return _MAPPERS.register(cls, checkpoint)


def load_monai(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a MONAI `UNETR` (into `UNETR`), `SwinUNETR` (into `SwinUNETR`) or `ViT` state dict.

    Loading is strict: every medvit parameter must be filled and every MONAI tensor used
    (only MONAI's unused cross-attention norms are skipped).

    Args:
        model: A medvit UNETR with a ViT encoder, a SwinUNETR, or a VisionTransformer.
        state_dict: MONAI's `model.state_dict()`.

    Returns:
        The model, loaded in place.

    Raises:
        ValueError: No mapper for this model class, or the weights do not fit the model
            (names or shapes).
    """
    return _MAPPERS.load(model, state_dict)


import_family_modules(__name__, __path__)
