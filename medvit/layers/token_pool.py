"""1D max pooling of a token sequence (HVT's stage downsampling)."""

from __future__ import annotations

import torch
import torch.nn as nn


class TokenMaxPool1d(nn.Module):
    """Max-pool a `(B, N, D)` token sequence along N, channel by channel.

    Args:
        kernel_size: Pooling window over consecutive tokens.
        stride: Step between windows.
        padding: Implicit -inf padding at both ends.
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 0) -> None:
        super().__init__()
        if kernel_size < 1 or stride < 1 or padding < 0 or 2 * padding > kernel_size:
            raise ValueError(
                f"invalid token pooling kernel_size={kernel_size}, stride={stride}, padding={padding}"
            )
        self.pool = nn.MaxPool1d(kernel_size, stride, padding)

    def out_len(self, n: int) -> int:
        """Sequence length after pooling `n` tokens."""
        p = self.pool
        return (n + 2 * p.padding - p.kernel_size) // p.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.transpose(1, 2)).transpose(1, 2)
