"""Optimisers and their helpers for training: SAM / ASAM, parameter groups, EMA, LR factors.

Importing the package loads no torch (`medvit.optim.schedule` is pure Python, and the CLI
reads its schedule names); the names below load their module on first use.
`param_groups` is imported from its module, `medvit.optim.param_groups`, whose name it shares.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "SAM": "sam",
    "AdafactorViT": "adafactor",
    "make_optimizer": "factory",
    "OPTIMIZERS": "factory",
    "model_ema": "ema",
    "lr_factor": "schedule",
    "schedule_factor": "schedule",
}

__all__ = [
    "OPTIMIZERS",
    "SAM",
    "AdafactorViT",
    "lr_factor",
    "make_optimizer",
    "model_ema",
    "schedule_factor",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"medvit.optim.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'medvit.optim' has no attribute {name!r}")
