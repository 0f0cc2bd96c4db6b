"""Sharpness-aware minimisation (SAM) and its adaptive form (ASAM).

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
ICLR 2021; Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
Learning of Deep Neural Networks", ICML 2021. Chen et al., "When Vision Transformers
Outperform ResNets without Pre-training or Strong Data Augmentations", ICLR 2022, train
ViTs with SAM around AdamW.

Each step takes two gradients: one at the weights `w` to find the ascent direction, one
at the perturbed weights `w + e(w)`; the base optimiser then steps from `w` with the
second gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class SAM(torch.optim.Optimizer):
    """Wraps a base optimiser with SAM's (or ASAM's) two-gradient step.

    SAM: `e(w) = rho * g / ||g||`. ASAM: `e(w) = rho * w^2 g / ||w g||` (elementwise
    products; the perturbation is scaled by `|w|`, so it is invariant to rescaling weights).
    The norm is taken over all parameters of all groups together.

    Use either the closure form, `optimizer.step(closure)` where the closure zeroes nothing,
    runs forward and backward and returns the loss, or the two halves:

        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)

    Args:
        params: Parameters or parameter groups (groups may set their own `rho`, `adaptive`).
        base_optimizer: Optimiser class (e.g. `torch.optim.AdamW`), built on the same groups.
        rho: Radius of the neighbourhood.
        adaptive: ASAM instead of SAM.
        **base_kwargs: Arguments of the base optimiser (lr, weight_decay, ...).

    Raises:
        ValueError: `rho` is negative.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if rho < 0.0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **base_kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # share the groups, so LR schedulers that change ours change the base optimiser's
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @staticmethod
    def _scaled(p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """`g` (SAM) or `|w| g` (ASAM): the vector whose norm sets the step."""
        return torch.abs(p) * p.grad if group["adaptive"] else p.grad

    def _grad_norm(self) -> torch.Tensor:
        norms = [self._scaled(p, g).norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.stack([n.to(device) for n in norms]).norm(p=2)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> None:
        """Move to `w + e(w)`, remembering `w`; gradients at `w` must be in `.grad`."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.detach().clone()
                e = (torch.square(p) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Restore `w` and take the base step with the gradient found at `w + e(w)`."""
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Both halves: `closure` runs forward and backward and returns the loss.

        Returns:
            The loss at `w` (the closure's first value).

        Raises:
            ValueError: No closure.
        """
        if closure is None:
            raise ValueError("SAM.step needs a closure (forward + backward); or call first_step/second_step")
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimiser's state (SAM keeps nothing between steps)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
