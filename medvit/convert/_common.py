"""Shared pieces of the checkpoint converters: prefix stripping and strict loading."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

from medvit.layers import resample_pos_embed

StateDict = dict[str, torch.Tensor]


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
