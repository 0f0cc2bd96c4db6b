"""`make_optimizer`: AdamW, SGD or one of two Adafactors by name, optionally inside SAM / ASAM.

`adafactor` is `torch.optim.Adafactor` as it is (Shazeer & Stern 2018): for a matrix it keeps
only a row and a column vector of the second moment (factored), no first moment, and steps
relative to the parameter's RMS (`min(lr, 1/sqrt(t)) * RMS(w)`), with decoupled weight decay.
`adafactor_vit` is Zhai et al.'s modification for ViTs ("Scaling Vision Transformers", CVPR
2022; `medvit.optim.adafactor.AdafactorViT`): a bfloat16 first moment, a fixed LR, beta2
capped at 0.999. Their separate head weight decay comes from `param_groups`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from medvit.optim.adafactor import AdafactorViT
from medvit.optim.sam import SAM

OPTIMIZERS = ("adamw", "sgd", "adafactor", "adafactor_vit")
SAM_KINDS = (None, "sam", "asam")


def _base(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    if name == "adamw":
        return torch.optim.AdamW, dict(betas=(0.9, 0.999), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD, dict(momentum=0.9, nesterov=True)
    if name == "adafactor":
        return torch.optim.Adafactor, {}
    if name == "adafactor_vit":
        return AdafactorViT, {}
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def make_optimizer(
    name: str,
    params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    lr: float,
    weight_decay: float = 0.0,
    sam: str | None = None,
    rho: float = 0.05,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build an optimiser.

    Parameter groups that carry an `lr_scale` (from `param_groups`) get `lr * lr_scale` as
    their LR; groups that carry a `weight_decay` keep it (`weight_decay` is the default).

    Args:
        name: `adamw` (betas 0.9/0.999), `sgd` (Nesterov momentum 0.9), `adafactor` (torch's)
            or `adafactor_vit` (`AdafactorViT`).
        params: Parameters or groups.
        lr: Learning rate.
        weight_decay: Default weight decay (decoupled for AdamW and Adafactor, L2 for SGD).
        sam: None, `sam` or `asam` (adaptive) to wrap the optimiser in `SAM`.
        rho: SAM's radius (Foret et al. use 0.05; ASAM typically needs ~10x larger).
        **kwargs: Override the base optimiser's defaults (betas, momentum, ...).

    Returns:
        The optimiser (a `SAM` when `sam` is set: call `step(closure)`).

    Raises:
        ValueError: Unknown `name` or `sam`.
    """
    if sam not in SAM_KINDS:
        raise ValueError(f"sam must be None, 'sam' or 'asam', got {sam!r}")
    cls, defaults = _base(name)
    options = {**defaults, **kwargs, "lr": lr, "weight_decay": weight_decay}
    groups = list(params)
    if groups and isinstance(groups[0], dict):
        groups = [{**g, "lr": g.get("lr", lr) * g["lr_scale"]} if "lr_scale" in g else dict(g) for g in groups]
    if sam is None:
        return cls(groups, **options)
    return SAM(groups, cls, rho=rho, adaptive=sam == "asam", **options)
