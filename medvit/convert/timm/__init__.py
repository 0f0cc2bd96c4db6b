"""Load timm state dicts into the medvit model of the same name.

One module per model family in this package registers its mapper with
`register_timm_mapper`; every module here is imported, so a new family only adds a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from medvit.convert._common import Mapper, MapperRegistry, import_family_modules, load_strict, unwrap

_MAPPERS: MapperRegistry[Mapper] = MapperRegistry("timm", "load_timm does not know how to load into {}")


def register_timm_mapper(cls: type) -> Callable[[Mapper], Mapper]:
    """Register the function that maps a timm state dict for models of class `cls`."""
    return _MAPPERS.register(cls)


def load_timm(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore_head: bool = False
) -> nn.Module:
    """Load a timm state dict, strictly, into a medvit model of the same architecture.

    Args:
        model: The medvit model (created under the timm model's name).
        state_dict: timm's `model.state_dict()` or a checkpoint's weights.
        ignore_head: Skip the classifier (`head.*`) and keep the model's own, for
            fine-tuning on another label set.

    Returns:
        The model, loaded in place.

    Raises:
        ValueError: No mapper for this model class, or the weights do not fit.
    """
    mapper, checkpoint = _MAPPERS.find(model)
    sd = mapper(unwrap(state_dict), model)
    if ignore_head:
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in own.items() if k.startswith("head.")})
    return load_strict(model, sd, checkpoint)


import_family_modules(__name__, __path__)
