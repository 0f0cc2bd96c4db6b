"""Optimiser parameter groups: no weight decay on biases, norms and tokens; a head of its own.

Zhai et al., "Scaling Vision Transformers", CVPR 2022, decouple the head's weight decay
from the body's (a high decay on the head, a low one on the body, helps few-shot transfer).
DeiT and timm exclude biases, normalisation weights, position embeddings and the class /
distillation tokens from weight decay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

# Parameters whose name contains one of these are never decayed (timm's `no_weight_decay`
# sets of the ViT families, and the relative position tables of Swin / MViT / HaloNet).
NO_DECAY_NAMES = (
    "pos_embed",
    "cls_token",
    "dist_token",
    "reg_token",
    "relative_position_bias_table",
    "rel_pos",
)


def is_head(name: str, head_names: Sequence[str]) -> bool:
    """Whether parameter `name` belongs to a head: its first component is a head name, or a
    head name followed by `_` (`head`, `head_dist`, `head_cov` for `head_names=("head",)`)."""
    first = name.split(".", 1)[0]
    return any(first == h or first.startswith(h + "_") for h in head_names)


def is_no_decay(name: str, ndim: int) -> bool:
    """Biases, norm scales and every other 0-/1-D parameter, and the tokens of `NO_DECAY_NAMES`."""
    return ndim <= 1 or name.endswith(".bias") or any(n in name for n in NO_DECAY_NAMES)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    head_weight_decay: float | None = None,
    head_names: Sequence[str] = ("head",),
    no_decay_bias_norm: bool = True,
    lr_scale_head: float = 1.0,
) -> list[dict[str, Any]]:
    """Parameter groups for an optimiser: body, body without decay, head, head without decay.

    Frozen parameters (`requires_grad=False`) are left out; empty groups are dropped. Every
    group has `name`, `params`, `weight_decay` and `lr_scale` (multiply the LR by it; a
    scheduler that sets `lr` should read it, `make_optimizer` applies it once at the start).

    Args:
        model: The model, unwrapped (a DDP wrapper prefixes every name with `module.`).
        weight_decay: Decay of the body's weights.
        head_weight_decay: Decay of the head's weights; None: `weight_decay`.
        head_names: Top-level module names of the head (see `is_head`).
        no_decay_bias_norm: Exclude biases, norms and tokens from decay (in head and body).
        lr_scale_head: LR multiplier of the head's groups.

    Returns:
        The groups, in the order body, body_no_decay, head, head_no_decay.
    """
    head_wd = weight_decay if head_weight_decay is None else head_weight_decay
    groups: dict[str, dict[str, Any]] = {
        "body": dict(weight_decay=weight_decay, lr_scale=1.0),
        "body_no_decay": dict(weight_decay=0.0, lr_scale=1.0),
        "head": dict(weight_decay=head_wd, lr_scale=lr_scale_head),
        "head_no_decay": dict(weight_decay=0.0, lr_scale=lr_scale_head),
    }
    for g in groups.values():
        g["params"] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "head" if is_head(name, head_names) else "body"
        if no_decay_bias_norm and is_no_decay(name, p.ndim):
            key += "_no_decay"
        groups[key]["params"].append(p)
    return [dict(name=k, **g) for k, g in groups.items() if g["params"]]
