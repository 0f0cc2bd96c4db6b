"""1D sliding-window attention with global tokens, over a sequence of frames (VTN).

Each frame token attends to the frame tokens at most `window_size` positions away and to
the global tokens in front of them; global tokens ([CLS]) attend to everything, as in
Longformer. The window is an additive (boolean) mask over full attention: exact, and cheap
at video lengths (a few hundred frames at most). Unlike Longformer, global and local
attention share one q/k/v projection, so the layer is `Attention` plus a mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.attention import Attention
from medvit.layers.attention_capture import capturing, record_attention


def longformer_mask_1d(
    num_tokens: int, window_size: int, num_global: int, device: torch.device
) -> torch.Tensor:
    """Boolean `(N, N)` mask, True where a query may attend to a key."""
    idx = torch.arange(num_tokens, device=device)
    mask = (idx[:, None] - idx[None, :]).abs() <= window_size
    mask[:num_global, :] = True
    mask[:, :num_global] = True
    return mask


class LongformerAttention1d(Attention):
    """Multi-head attention restricted to a 1D window, plus global (prefix) tokens.

    Args:
        dim: Token width.
        num_heads: Attention heads; must divide `dim`.
        window_size: Half-width of the window: a token sees `2 * window_size + 1` tokens.
        num_global: Number of global tokens at the front of the sequence.
        qkv_bias: Bias of the q/k/v projection.
        qk_norm: Normalise queries and keys per head.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Norm used by `qk_norm`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        window_size: int = 4,
        num_global: int = 1,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer)
        if window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {window_size}")
        if num_global < 0:
            raise ValueError(f"num_global must be >= 0, got {num_global}")
        self.window_size = window_size
        self.num_global = num_global

    def forward(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        mask = longformer_mask_1d(n, self.window_size, self.num_global, x.device)
        q, k, v = self.qkv_heads(x)
        attn = None
        if return_attn or capturing():
            attn = ((q * self.scale) @ k.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
            attn = attn.softmax(dim=-1)
            record_attention(self, attn, axes=(0,))  # over the frames of a clip
            x = self.attn_drop(attn) @ v
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))
        return (x, attn) if return_attn else x
