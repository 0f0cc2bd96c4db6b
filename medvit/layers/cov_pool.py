"""Second-order (covariance) pooling with iterative matrix square-root normalisation.

iSQRT-COV (Li et al., "Towards Faster Training of Global Covariance Pooling Networks by
Iterative Matrix Square Root Normalization", CVPR 2018): the covariance of the features
is divided by its trace, its square root is approximated by a few coupled Newton-Schulz
iterations (only matrix products, so fast on GPUs and differentiable by autograd), the
trace is compensated back, and the upper triangle of the symmetric result is the
representation. So-ViT pools its visual tokens this way.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def covariance(x: torch.Tensor) -> torch.Tensor:
    """Covariance over the tokens of `(B, N, d)` features, `(B, d, d)`, symmetric PSD."""
    x = x - x.mean(dim=1, keepdim=True)
    return x.transpose(1, 2) @ x / x.shape[1]


def sqrtm_newton_schulz(a: torch.Tensor, num_iters: int = 5, eps: float = 1e-8) -> torch.Tensor:
    """Approximate square root of symmetric PSD matrices `(B, d, d)` (iSQRT-COV).

    Pre-normalised by the trace, so every eigenvalue lies in [0, 1] where the coupled
    iteration Y <- Y T, Z <- T Z with T = (3I - ZY) / 2 converges to (A / tr A)^(1/2);
    the result is scaled back by sqrt(tr A).
    """
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(eps)[:, None, None]
    y, z = a / trace, eye
    for _ in range(num_iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return y * trace.sqrt()


def triu_vectorize(a: torch.Tensor) -> torch.Tensor:
    """Upper triangle (diagonal included) of `(B, d, d)` as `(B, d (d + 1) / 2)`."""
    rows, cols = torch.triu_indices(a.shape[-1], a.shape[-1], device=a.device)
    return a[:, rows, cols]


class CovariancePool(nn.Module):
    """Tokens -> width reduction -> covariance -> matrix square root -> upper triangle.

    The reduction is iSQRT-COV's 1x1 conv + BN + ReLU, here applied to each token; the
    covariance and its square root are computed in float32 whatever the input dtype,
    since Newton-Schulz in half precision loses the small eigenvalues.

    Args:
        in_features: Token width.
        cov_dim: Width after the reduction; the output has `cov_dim (cov_dim + 1) / 2`
            features.
        num_iters: Newton-Schulz iterations (5 in iSQRT-COV).
    """

    def __init__(self, in_features: int, cov_dim: int = 48, num_iters: int = 5) -> None:
        super().__init__()
        if cov_dim < 2:
            raise ValueError(f"cov_dim must be >= 2, got {cov_dim}")
        if num_iters < 1:
            raise ValueError(f"num_iters must be >= 1, got {num_iters}")
        self.cov_dim = cov_dim
        self.num_iters = num_iters
        self.num_features = cov_dim * (cov_dim + 1) // 2
        self.reduce = nn.Linear(in_features, cov_dim, bias=False)
        self.norm = nn.BatchNorm1d(cov_dim)
        self.act = nn.ReLU()

    def reduced_covariance(self, x: torch.Tensor) -> torch.Tensor:
        """Covariance of the reduced tokens: `(B, N, C)` -> `(B, cov_dim, cov_dim)`, float32."""
        x = self.act(self.norm(self.reduce(x).transpose(1, 2))).transpose(1, 2)
        with torch.autocast(x.device.type, enabled=False):
            return covariance(x.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.reduced_covariance(x)
        with torch.autocast(x.device.type, enabled=False):
            out = triu_vectorize(sqrtm_newton_schulz(cov, self.num_iters))
        return out.to(x.dtype)
