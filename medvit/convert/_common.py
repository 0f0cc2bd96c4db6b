"""Shared pieces of the checkpoint converters: the class-keyed mapper registry, key
renaming, prefix stripping, strict loading and position-table fitting.

Every source (`timm/`, `monai/`, `torchvision/`, and the image-to-video `inflate/`) is a
package whose `__init__` holds one `MapperRegistry` and the source's `load_*` entry point;
each of its modules maps one model family and registers its function with the decorator.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Generic, TypeVar

import torch
import torch.nn as nn

from medvit.layers import resample_pos_embed

StateDict = dict[str, torch.Tensor]
# (checkpoint state dict, the medvit model to fill) -> the model's state dict
Mapper = Callable[[StateDict, nn.Module], StateDict]
Fn = TypeVar("Fn", bound=Callable[..., StateDict])


def unwrap(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop the `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes."""
    out: StateDict = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _short(keys: list[str], n: int = 6) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_strict(model: nn.Module, state_dict: StateDict, source: str) -> nn.Module:
    """Load every parameter and buffer, or raise a ValueError saying what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_short(shapes, 3)}")
    if problems:
        name = getattr(model, "model_name", type(model).__name__)
        raise ValueError(f"{source} weights do not fit {name}: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    return model


def fit_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, ...], num_prefix_tokens: int
) -> torch.Tensor:
    """Resample a checkpoint's position table to the model's grid when they differ.

    The checkpoint's grid is inferred as a cube (or square) of its patch-token count,
    which holds for every checkpoint trained on isotropic crops.
    """
    n_target = num_prefix_tokens + math.prod(grid)
    if pos_embed.shape[1] == n_target:
        return pos_embed
    n = pos_embed.shape[1] - num_prefix_tokens
    side = round(n ** (1.0 / len(grid)))
    if side ** len(grid) != n:
        raise ValueError(
            f"cannot infer the grid of a {n}-token position embedding to resample it to {grid}"
        )
    return resample_pos_embed(pos_embed, grid, (side,) * len(grid), num_prefix_tokens)


class MapperRegistry(Generic[Fn]):
    """One source's mapping functions, keyed by the medvit model class each fills.

    Args:
        source: Name of the checkpoint source in load errors (`timm`, `MONAI`, ...).
        unknown: Error for a model no function is registered for; `{}` is its class name.
    """

    def __init__(self, source: str, unknown: str) -> None:
        self.source = source
        self.unknown = unknown
        self._fns: dict[type, tuple[Fn, str]] = {}

    def register(self, cls: type, checkpoint: str | None = None) -> Callable[[Fn], Fn]:
        """Decorator: the function maps this source's checkpoints into models of class `cls`.

        Args:
            cls: The medvit model class (subclasses use it unless they register their own).
            checkpoint: The source's model named in load errors (`MONAI UNETR`); None: the
                source's name alone.
        """

        def wrap(fn: Fn) -> Fn:
            self._fns[cls] = (fn, checkpoint or self.source)
            return fn

        return wrap

    def find(self, model: nn.Module) -> tuple[Fn, str]:
        """The function for `model` and the checkpoint name for its errors.

        The most specific registered class of the model wins (a DeiT mapper over the ViT
        one it extends).

        Raises:
            ValueError: No function is registered for the model's class or its bases.
        """
        for cls in type(model).__mro__:
            if cls in self._fns:
                return self._fns[cls]
        raise ValueError(self.unknown.format(type(model).__name__))

    def load(self, model: nn.Module, state_dict: Mapping[str, torch.Tensor], *args: object) -> nn.Module:
        """Map `state_dict` (wrapper prefixes dropped) by the model's function, load it strictly.

        Raises:
            ValueError: No function for the model, or the mapped weights do not fit it.
        """
        fn, checkpoint = self.find(model)
        return load_strict(model, fn(unwrap(state_dict), model, *args), checkpoint)


def import_family_modules(package: str, path: Iterable[str]) -> None:
    """Import every public module of a source package, so each registers its mapper."""
    for mod in pkgutil.iter_modules(path):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{package}.{mod.name}")


def rename_first(key: str, rules: Iterable[tuple[str, str]]) -> str:
    """`key` rewritten by the first `(pattern, replacement)` rule that matches; else as is."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key
