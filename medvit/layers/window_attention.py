"""(Shifted) window self-attention with a relative position bias, in 2D or 3D, and patch merging.

Used by Swin Transformer and by 3D Swin encoders (Swin-UNETR). Tensors are channels-last
grids `(B, *grid, C)` so the surrounding `Block` (norms, MLP) works on them unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.attention_capture import attend, capturing

# timm and the reference Swin use -100 rather than -inf so fully masked rows stay finite
MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """`(B, *grid, C)` with window-divisible grid -> `(B * num_windows, prod(window), C)`."""
    b, *grid, c = x.shape
    nd = len(window)
    shape = [b]
    for g, w in zip(grid, window):
        shape += [g // w, w]
    x = x.view(*shape, c)
    perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)] + [1 + 2 * nd]
    return x.permute(*perm).reshape(-1, math.prod(window), c)


def window_reverse(windows: torch.Tensor, window: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Inverse of `window_partition`: `(B * num_windows, prod(window), C)` -> `(B, *grid, C)`."""
    nd = len(window)
    c = windows.shape[-1]
    counts = [g // w for g, w in zip(grid, window)]
    x = windows.view(-1, *counts, *window, c)
    perm = [0]
    for i in range(nd):
        perm += [1 + i, 1 + nd + i]
    return x.permute(*perm, 1 + 2 * nd).reshape(-1, *grid, c)


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """Index into a `prod(2 * w - 1)` bias table for every pair of tokens in a window."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    index = torch.zeros(rel.shape[:2], dtype=torch.long)
    for i, w in enumerate(window):
        stride = math.prod(2 * v - 1 for v in window[i + 1 :])
        index += (rel[..., i] + w - 1) * stride
    return index


def border_window_masks(
    grid: Sequence[int], window: Sequence[int], shift: Sequence[int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of a rolled grid that mix regions, and their additive masks `(m, N, N)`.

    Only windows along the far border of each shifted axis mix regions; the others need
    no mask, so attention there broadcasts the relative bias instead of materialising
    `(windows, heads, N, N)` bias + mask tensors.
    """
    img = torch.zeros((1, *grid, 1), device=device)
    slices = [
        (slice(0, -w), slice(-w, -s), slice(-s, None)) if s > 0 else (slice(None),)
        for w, s in zip(window, shift)
    ]
    for cnt, region in enumerate(_product(slices)):
        img[(slice(None), *region, slice(None))] = cnt
    ids = window_partition(img, window).squeeze(-1)  # (num_windows, N)
    mixed = torch.nonzero((ids != ids[:, :1]).any(1)).flatten()
    sub = ids[mixed]
    diff = sub[:, None, :] - sub[:, :, None]
    return mixed, torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)


def _biased_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
    masks: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None, drop: float,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias [+ shift mask]) v, written out: what
    `scaled_dot_product_attention` computes with a float mask, for training on CPUs, where
    its math fallback also scans every score row for -inf (a quarter more time per step).
    The masks here are finite (`MASK_VALUE`), so no row is ever fully masked."""
    bw, heads, n, _ = q.shape
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))
    # bias and mask in the scores' precision: an fp32 bias would promote the bf16 scores of
    # autocast to fp32, and every add, softmax and cast after it would move twice the bytes
    bias = bias.to(scores.dtype)
    if masks is None:
        scores = scores + bias
    else:
        nw, _, mixed, mask = masks
        full = mask.new_zeros(nw, 1, n, n, dtype=scores.dtype)
        full[mixed] = mask[:, None].to(scores.dtype)
        scores = (scores.view(bw // nw, nw, heads, n, n) + (full + bias)).view(bw, heads, n, n)
    attn = scores.softmax(-1)
    if drop:
        attn = F.dropout(attn, drop)
    return torch.matmul(attn, v)


@functools.lru_cache(maxsize=8)  # a 3D Swin uses one entry per shifted stage and dtype
def _shift_masks(
    grid: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`border_window_masks` of one configuration, made once per process: (number of
    windows, indices of the windows without a mask, of those with one, their masks in
    `dtype`). They depend only on the grid, so every block and every window reuses them."""
    mixed, mask = border_window_masks(grid, window, shift, device)
    num_windows = math.prod(g // w for g, w in zip(grid, window))
    is_mixed = torch.zeros(num_windows, dtype=torch.bool, device=device)
    is_mixed[mixed] = True
    plain = torch.nonzero(~is_mixed).flatten()
    return num_windows, plain, mixed, mask.to(dtype)


def _batched(index: torch.Tensor, num_windows: int, batch: int) -> torch.Tensor:
    """Window indices of one image repeated for every image of a `(batch * num_windows)` stack."""
    if batch == 1:
        return index
    return (torch.arange(batch, device=index.device)[:, None] * num_windows + index).flatten()


def _product(lists: list[tuple[slice, ...]]) -> list[tuple[slice, ...]]:
    out: list[tuple[slice, ...]] = [()]
    for options in lists:
        out = [o + (s,) for o in out for s in options]
    return out


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (optionally cyclically shifted) local windows.

    Takes and returns channels-last grids `(B, *grid, C)`; the grid is zero-padded to a
    multiple of the window, as in the reference Swin and MONAI's Swin-UNETR. The signature
    matches `Block`'s `attn_layer` contract, so a Swin block is `Block` with this attention
    (bind `window_size` and `shift_size` with `functools.partial`).

    Args:
        dim: Token width.
        num_heads: Attention heads.
        window_size: Window extent per spatial dimension (its length sets 2D or 3D).
        shift_size: Cyclic shift per dimension (0 = regular windows, W-MSA).
        qkv_bias: Bias of the q/k/v projection.
        qk_norm: Not supported by Swin; must be False.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
        norm_layer: Unused; accepted for `Block`'s interface.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Sequence[int] = (7, 7),
        shift_size: Sequence[int] = (0, 0),
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide the width ({dim})")
        if qk_norm:
            raise ValueError("WindowAttention does not support qk_norm")
        self.window_size = tuple(int(w) for w in window_size)
        self.shift_size = tuple(int(s) for s in shift_size)
        if len(self.shift_size) != len(self.window_size):
            raise ValueError(
                f"shift_size {self.shift_size} and window_size {self.window_size} differ in length"
            )
        if any(w < 1 or not 0 <= s < w for w, s in zip(self.window_size, self.shift_size)):
            raise ValueError(
                "need window_size >= 1 and 0 <= shift_size < window_size, "
                f"got {self.window_size} and {self.shift_size}"
            )
        self.num_heads = num_heads
        self.window_area = math.prod(self.window_size)
        self.attn_drop = attn_drop
        table = math.prod(2 * w - 1 for w in self.window_size)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(self.window_size).view(-1), persistent=False
        )
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _relative_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def _cached_bias(self) -> torch.Tensor:
        """The relative bias, contiguous, gathered once per weight version (inference only)."""
        table = self.relative_position_bias_table
        key = (table._version, table.dtype, table.device, table.data_ptr())
        cached = getattr(self, "_bias_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._relative_bias().contiguous())
            self._bias_cache = cached
        return cached[1]

    def _window_attention(
        self,
        x: torch.Tensor,
        masks: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None,
        grid: Sequence[int],
    ) -> torch.Tensor:
        """Attention within windows `(B * num_windows, N, C)`.

        Args:
            x: Window tokens.
            masks: For shifted windows, `_shift_masks` of the padded grid.
            grid: The unpadded token grid the windows tile (for `capture_attention`).
        """
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        exporting = torch.compiler.is_exporting()  # traced tensors have no data to key a cache on
        bias = self._cached_bias() if not (torch.is_grad_enabled() or exporting) else self._relative_bias()
        drop = self.attn_drop if self.training else 0.0
        if capturing():
            if masks is not None:  # the masks of the mixed windows, zeros elsewhere
                nw, _, mixed, mask = masks
                full = mask.new_zeros(nw, 1, n, n)
                full[mixed] = mask[:, None]
                bias = (bias + full).repeat(bw // nw, 1, 1, 1)
            y = attend(
                self, q, k, v, attn_mask=bias, dropout_p=drop, query_grid=self.window_size, query_prefix=0,
                key_prefix=0, tiled_grid=grid,
            )
        elif self.training and torch.is_grad_enabled() and q.device.type == "cpu" and not exporting:
            y = _biased_attention(q, k, v, bias, masks, drop)
        elif masks is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        else:
            nw, plain, mixed, mask = masks
            batch = bw // nw
            plain, mixed = _batched(plain, nw, batch), _batched(mixed, nw, batch)
            y = torch.empty_like(q)
            y[plain] = F.scaled_dot_product_attention(q[plain], k[plain], v[plain], attn_mask=bias, dropout_p=drop)
            mixed_bias = bias + mask[:, None]
            if batch > 1:
                mixed_bias = mixed_bias.repeat(batch, 1, 1, 1)
            y[mixed] = F.scaled_dot_product_attention(
                q[mixed], k[mixed], v[mixed], attn_mask=mixed_bias, dropout_p=drop
            )
        y = y.transpose(1, 2)
        if exporting:
            # eager attention returns heads inside tokens, so the reshape below is free; the
            # ONNX exporter's decomposed attention does not, and its reshape must copy
            y = y.clone(memory_format=torch.contiguous_format)
        return self.proj_drop(self.proj(y.reshape(bw, n, c)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = len(self.window_size)
        if x.ndim != nd + 2:
            raise ValueError(
                f"expected a (B, *grid, C) input with {nd} grid dims, got shape {tuple(x.shape)}"
            )
        grid = x.shape[1:-1]
        pads = [(w - g % w) % w for g, w in zip(grid, self.window_size)]
        if any(pads):
            # F.pad lists the last dimension first; channels (last) are not padded
            x = F.pad(x, [0, 0] + [p for pad in reversed(pads) for p in (0, pad)])
        padded = x.shape[1:-1]
        dims = tuple(range(1, nd + 1))
        masks = None
        if any(self.shift_size):
            x = torch.roll(x, [-s for s in self.shift_size], dims)
            masks = _shift_masks(tuple(padded), self.window_size, self.shift_size, x.device, x.dtype)
        y = self._window_attention(window_partition(x, self.window_size), masks, grid)
        x = window_reverse(y, self.window_size, padded)
        if any(self.shift_size):
            x = torch.roll(x, list(self.shift_size), dims)
        if any(pads):
            x = x[(slice(None), *[slice(0, g) for g in grid])]
        return x.contiguous()

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, num_heads={self.num_heads}"


class PatchMerging(nn.Module):
    """Concatenate each 2 x 2 (x 2) neighbourhood (4C or 8C), normalise, project to `out_dim`.

    The neighbours are concatenated with the last grid axis' offset varying slowest, as
    in timm's (and the reference) Swin: in 2D the order is (0,0), (1,0), (0,1), (1,1).
    Odd grid sizes are zero-padded.

    Args:
        spatial_dims: 2 or 3.
        dim: Input width.
        out_dim: Output width (defaults to `2 * dim`).
        norm_layer: Norm applied to the concatenated features.
    """

    def __init__(
        self,
        spatial_dims: int,
        dim: int,
        out_dim: int | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.out_dim = out_dim or 2 * dim
        merged = dim * 2**spatial_dims
        self.norm = norm_layer(merged)
        self.reduction = nn.Linear(merged, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *grid, c = x.shape
        nd = self.spatial_dims
        pads = [g % 2 for g in grid]
        if any(pads):
            x = F.pad(x, [0, 0] + [p for pad in reversed(pads) for p in (0, pad)])
            grid = [g + p for g, p in zip(grid, pads)]
        shape = [b]
        for g in grid:
            shape += [g // 2, 2]
        x = x.reshape(*shape, c)
        perm = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in reversed(range(nd))] + [1 + 2 * nd]
        x = x.permute(*perm).flatten(1 + nd)
        return self.reduction(self.norm(x))
