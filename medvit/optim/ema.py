"""Exponential moving average of a model's weights (and buffers), with torch's `AveragedModel`."""

from __future__ import annotations

import torch.nn as nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def model_ema(model: nn.Module, decay: float = 0.9999) -> AveragedModel:
    """An EMA copy of `model`: `ema = decay * ema + (1 - decay) * w` per update.

    The copy starts equal to `model` (the first `update_parameters` call copies the weights
    as they are then, later calls average). Buffers (BatchNorm statistics) are averaged too.
    After each optimiser step call `ema.update_parameters(model)`; evaluate `ema` (or
    `ema.module`) instead of the model. Move the model to its device before building this.

    Args:
        model: The model being trained (unwrapped from DDP).
        decay: EMA decay per update (DeiT's code uses 0.99996 per step).

    Raises:
        ValueError: `decay` outside [0, 1).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
