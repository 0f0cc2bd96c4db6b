"""Adafactor as modified for ViTs by Zhai et al., "Scaling Vision Transformers", CVPR 2022.

Shazeer & Stern's Adafactor (ICML 2018) keeps, for a matrix, only a row and a column
vector of the second moment (factored). Zhai et al. change it for ViTs: a first moment
(momentum 0.9) kept in bfloat16, no step scaled by the parameter's RMS, beta2 capped at
0.999, and the LR and weight decay given explicitly (big_vision's `scale_by_adafactor`).
Per step t and parameter w with gradient g:

    beta2 = min(1 - t^-0.8, 0.999)
    v     = factored EMA of g^2 + eps (rows: means over the last axis, cols: over the
            second-to-last; v = row col / mean(row)); an EMA of g^2 for vectors
    u     = g / sqrt(v), scaled down to RMS(u) <= clip_threshold
    m     = beta1 m + (1 - beta1) u          (stored in `momentum_dtype`)
    w     = w (1 - lr wd) - lr m

`torch.optim.Adafactor` is the plain form (no first moment, relative steps).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class AdafactorViT(torch.optim.Optimizer):
    """Adafactor with a low-precision first moment and a fixed LR (see the module notes).

    Args:
        params: Parameters or groups.
        lr: Learning rate.
        beta1: Momentum; None keeps no first moment.
        decay_rate: beta2 = 1 - t^-decay_rate.
        beta2_cap: Largest beta2.
        eps: Added to g^2.
        clip_threshold: Largest RMS of the update before momentum.
        weight_decay: Decoupled weight decay (multiplied by the LR, as AdamW).
        momentum_dtype: dtype the first moment is stored in.

    Raises:
        ValueError: A negative LR or weight decay, or beta1 outside [0, 1).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta1: float | None = 0.9,
        decay_rate: float = 0.8,
        beta2_cap: float = 0.999,
        eps: float = 1e-30,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        momentum_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be non-negative, got {lr} and {weight_decay}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        defaults = dict(
            lr=lr,
            beta1=beta1,
            decay_rate=decay_rate,
            beta2_cap=beta2_cap,
            eps=eps,
            clip_threshold=clip_threshold,
            weight_decay=weight_decay,
            momentum_dtype=momentum_dtype,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _second_moment(state: dict[str, Any], g2: torch.Tensor, beta2: float) -> torch.Tensor:
        if g2.ndim < 2:
            if "v" not in state:
                state["v"] = torch.zeros_like(g2)
            state["v"].lerp_(g2, 1.0 - beta2)
            return state["v"]
        if "row" not in state:
            state["row"] = torch.zeros(g2.shape[:-1], dtype=g2.dtype, device=g2.device)
            state["col"] = torch.zeros(g2.shape[:-2] + g2.shape[-1:], dtype=g2.dtype, device=g2.device)
        row, col = state["row"], state["col"]
        row.lerp_(g2.mean(-1), 1.0 - beta2)
        col.lerp_(g2.mean(-2), 1.0 - beta2)
        return row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(-1, keepdim=True).unsqueeze(-1)

    @torch.no_grad()
    def step(self, closure: Any = None) -> torch.Tensor | None:  # type: ignore[override]
        """One update; `closure` (optional) re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                state["step"] = state.get("step", 0) + 1
                beta2 = min(1.0 - state["step"] ** -group["decay_rate"], group["beta2_cap"])
                v = self._second_moment(state, g * g + group["eps"], beta2)
                u = g * v.rsqrt()
                rms = u.square().mean().sqrt()
                u = u / torch.clamp(rms / group["clip_threshold"], min=1.0)
                if group["beta1"] is not None:
                    if "m" not in state:
                        state["m"] = torch.zeros_like(p, dtype=group["momentum_dtype"])
                    m = state["m"].float().mul_(group["beta1"]).add_(u, alpha=1.0 - group["beta1"])
                    state["m"].copy_(m)
                    u = m
                if group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])
        return loss
