"""Load timm state dicts into the medvit model of the same name.

Each family registers a mapper here (`register_timm_mapper`); the ViT's parameter names
already follow timm's, so its mapper only fits the position table to the model's grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed, load_strict, unwrap
from medvit.models.image.vit import VisionTransformer

Mapper = Callable[[StateDict, nn.Module], StateDict]
_MAPPERS: dict[type, Mapper] = {}


def register_timm_mapper(cls: type) -> Callable[[Mapper], Mapper]:
    """Register the function that maps a timm state dict for models of class `cls`."""

    def wrap(fn: Mapper) -> Mapper:
        _MAPPERS[cls] = fn
        return fn

    return wrap


@register_timm_mapper(VisionTransformer)
def _map_vit(sd: StateDict, model: nn.Module) -> StateDict:
    if any(k == "reg_token" for k in sd):
        raise ValueError("timm ViTs with register tokens are not supported")
    if "pos_embed" in sd and isinstance(model.pos_embed, nn.Parameter):
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd["pos_embed"] = fit_pos_embed(sd["pos_embed"], model.grid_size, prefix)
    return sd


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
    mapper = next((fn for cls, fn in _MAPPERS.items() if isinstance(model, cls)), None)
    if mapper is None:
        raise ValueError(f"load_timm does not know how to load into {type(model).__name__}")
    sd = mapper(unwrap(state_dict), model)
    if ignore_head:
        own = model.state_dict()
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in own.items() if k.startswith("head.")})
    return load_strict(model, sd, "timm")
