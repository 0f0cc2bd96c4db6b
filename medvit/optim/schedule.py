"""Learning-rate factors of a step: linear warmup, then cosine or polynomial decay."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "poly")


def schedule_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """LR multiplier at `step`: linear warmup to 1 over `warmup` steps, then decay to 0 at `total`.

    `cosine`: `0.5 (1 + cos(pi t))`; `poly`: nnU-Net's `(1 - t)^0.9`, `t` the fraction of the
    steps after warmup that are done.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 at `total`."""
    return schedule_factor("cosine", step, total, warmup)
