"""Attention weights of any model, recorded while it runs (`capture_attention`).

Every attention layer of medvit reports its softmax weights through this module: layers
that compute them explicitly call `record_attention`, layers on the fused kernel call
`attend` instead of `F.scaled_dot_product_attention` (fused unless a capture is active, then
explicit, so the weights exist). Outside a capture both cost one context-variable read.

A record keeps the weights `(B', heads, N_q, N_k)` with the layout that places its tokens
in the input: the token grids of queries and keys, the prefix (class / distillation)
tokens before them, the input axes the grid spans (time alone for a temporal step) and,
for windowed attention, the grid the windows tile. What a layer does not know (a ViT block
sees only a sequence) is inferred when the capture closes, from the token count and the
input's shape; `AttentionRecord.query_stride` is then the input pixels per query token.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# record kinds: "tokens" (queries and keys are tokens of the input), "channel" (XCiT's
# cross-covariance attention: channels attend to channels), "sequence" (tokens with no
# place in the input, as CeiT's per-layer class tokens); only "tokens" have positions
KINDS = ("tokens", "channel", "sequence")


@dataclass
class AttentionRecord:
    """The attention weights of one call of one attention layer.

    Attributes:
        name: The layer's module name in the model (`blocks.3.attn`).
        probs: Weights `(B * groups, heads, N_q, N_k)`; every row sums to 1.
        kind: "tokens", or "channel" / "sequence" (no positions; distance is not defined).
        query_grid: Grid of the non-prefix query tokens (the window's shape for windowed
            attention); None where unknown.
        key_grid: Grid of the non-prefix key tokens (coarser for spatial reduction / pooling).
        query_prefix: Prefix (class / distillation) tokens before the query grid.
        key_prefix: Prefix tokens before the key grid.
        axes: Input axes the grids span, in order (None: all of them).
        tiled_grid: For windowed attention, the (unpadded) grid the windows tile; None when
            the query grid is the whole grid.
        tiles: Copies of the query grid side by side along each input axis (all axes, not
            only `axes`): sequences cut from patches of the input, as MedT's local branch;
            gives `tiled_grid` when that is not known.
        key_offset: Where the first key token's cell starts relative to the first query
            token's, in query tokens along `axes` (a halo: `-halo`); None: both start at 0.
        key_step: Key token size in query tokens; None: the keys tile the queries' extent
            (a window, or the whole grid reduced / pooled).
        query_stride: Input pixels per query token along `axes`, filled by the capture.
        key_stride: Input pixels per key token along `axes`, filled by the capture.
    """

    name: str
    probs: torch.Tensor
    kind: str = "tokens"
    query_grid: tuple[int, ...] | None = None
    key_grid: tuple[int, ...] | None = None
    query_prefix: int | None = None
    key_prefix: int | None = None
    axes: tuple[int, ...] | None = None
    tiled_grid: tuple[int, ...] | None = None
    tiles: tuple[int, ...] | None = None
    key_offset: tuple[float, ...] | None = None
    key_step: tuple[float, ...] | None = None
    query_stride: tuple[float, ...] | None = None
    key_stride: tuple[float, ...] | None = None

    @property
    def located(self) -> bool:
        """Whether query and key tokens have positions (mean attention distance is defined)."""
        return (
            self.kind == "tokens"
            and self.query_stride is not None
            and self.key_stride is not None
            and bool(self.query_grid)
            and bool(self.key_grid)
        )


@dataclass
class _Capture:
    names: dict[int, str]
    records: list[AttentionRecord] = field(default_factory=list)
    spatial_shape: tuple[int, ...] | None = None
    batch: int | None = None


_ACTIVE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("medvit_attention", default=None)
_HINT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("medvit_attn_hint", default=None)


def capturing() -> bool:
    """Whether a `capture_attention` is active (layers then compute their weights explicitly)."""
    return _ACTIVE.get() is not None


@contextmanager
def attention_layout(**layout: Any) -> Iterator[None]:
    """Tell the attention layers called inside what their tokens are (grouping callers).

    A block that regroups tokens before a plain attention layer (divided space-time
    attention, TNT's pixels inside a patch) knows the layout the layer cannot see; the
    keywords are `AttentionRecord` fields and apply to every record made inside.
    """
    if _ACTIVE.get() is None:
        yield
        return
    token = _HINT.set({**(_HINT.get() or {}), **layout})
    try:
        yield
    finally:
        _HINT.reset(token)


def record_attention(module: nn.Module, probs: torch.Tensor, **layout: Any) -> None:
    """Record `probs` `(B', heads, N_q, N_k)` of `module` when a capture is active.

    Args:
        module: The attention layer (its name in the model is looked up).
        probs: Softmax weights; rows sum to 1.
        **layout: `AttentionRecord` fields the layer knows (grids, prefixes, axes, kind).
    """
    cap = _ACTIVE.get()
    if cap is None:
        return
    fields = {**(_HINT.get() or {}), **{k: v for k, v in layout.items() if v is not None}}
    for key in ("query_grid", "key_grid", "axes", "tiled_grid", "tiles", "key_offset", "key_step"):
        if fields.get(key) is not None:
            fields[key] = tuple(float(g) if key.startswith("key_") and key != "key_grid" else int(g)
                                for g in fields[key])
    name = cap.names.get(id(module), type(module).__name__)
    cap.records.append(AttentionRecord(name=name, probs=probs.detach().float(), **fields))


def attend(
    module: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    **layout: Any,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, explicit and recorded while a capture is active.

    Args:
        module: The calling attention layer.
        q: Queries `(..., N_q, d)`.
        k: Keys `(..., N_k, d)`.
        v: Values `(..., N_k, d_v)`.
        attn_mask: Additive float mask / bias broadcast to the logits, or None.
        dropout_p: Dropout on the weights (training only, as the caller decides).
        scale: Logit scale; None is 1/sqrt(d).
        **layout: Passed to `record_attention`.
    """
    if _ACTIVE.get() is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * s) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits + attn_mask
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, *probs.shape[-3:]) if probs.ndim > 4 else probs
    record_attention(module, flat, **layout)
    return F.dropout(probs, dropout_p) @ v


@contextmanager
def capture_attention(
    model: nn.Module, spatial_shape: Sequence[int] | None = None
) -> Iterator[list[AttentionRecord]]:
    """Record the attention weights of every attention layer while `model` runs.

    ```
    with torch.no_grad(), capture_attention(model) as records:
        model(x)
    records[0].probs  # (B, heads, N, N) of the first layer called
    ```

    The list fills while the model runs; when the block exits, the grids, prefixes and
    strides that no layer gave are inferred from the token counts and the shape of the
    model's input (`spatial_shape` overrides it; needed when the model is called through
    something other than its own `forward`).

    Args:
        model: Any medvit model (or layer).
        spatial_shape: Spatial shape of the input, `(H, W)`, `(D, H, W)` or `(T, H, W)`.
    """
    cap = _Capture(names={id(m): n or type(m).__name__ for n, m in model.named_modules()})
    if spatial_shape is not None:
        cap.spatial_shape = tuple(int(s) for s in spatial_shape)

    def pre_hook(_: nn.Module, args: tuple[Any, ...]) -> None:  # (B, C, *spatial) images, volumes, clips
        if cap.batch is None and args and isinstance(args[0], torch.Tensor) and args[0].ndim >= 4:
            cap.batch = int(args[0].shape[0])
            if cap.spatial_shape is None:
                cap.spatial_shape = tuple(int(s) for s in args[0].shape[2:])

    handle = model.register_forward_pre_hook(pre_hook)
    token = _ACTIVE.set(cap)
    try:
        yield cap.records
    finally:
        _ACTIVE.reset(token)
        handle.remove()
    if cap.spatial_shape is not None:
        cap.records[:] = [_locate(r, cap.spatial_shape, cap.batch) for r in cap.records]


def _grid_for(shape: Sequence[int], n: int) -> tuple[int, ...] | None:
    """The grid `ceil(shape / stride)` with `n` cells: isotropic strides first, then (3D)
    a separate stride on the first axis (video tubelets), the smallest first."""
    top = max(shape)
    for s in range(1, top + 1):
        g = tuple(math.ceil(d / s) for d in shape)
        if math.prod(g) == n:
            return g
    if len(shape) == 3:
        for s0 in range(1, shape[0] + 1):
            for s in range(1, max(shape[1:]) + 1):
                g = (math.ceil(shape[0] / s0), *(math.ceil(d / s) for d in shape[1:]))
                if math.prod(g) == n:
                    return g
    side = round(n ** (1 / len(shape)))
    if len(set(shape)) == 1 and side**len(shape) == n:  # a square input, unpadded convolutions
        return (side,) * len(shape)
    return None


def _count(grid: tuple[int, ...]) -> int:
    """Tokens on `grid`; an empty grid (a class-token query) has none."""
    return math.prod(grid) if grid else 0


def _infer(shape: Sequence[int], n: int, prefix: int | None) -> tuple[int, tuple[int, ...]] | None:
    """(prefix, grid) for `n` tokens over `shape`: the fewest prefix tokens (at most 2) that fit."""
    for p in (prefix,) if prefix is not None else (0, 1, 2):
        if n - p > 0:
            g = _grid_for(shape, n - p)
            if g is not None:
                return p, g
    return None


def _locate(rec: AttentionRecord, spatial_shape: tuple[int, ...], batch: int | None) -> AttentionRecord:
    """Fill the grids, prefixes and strides `rec` lacks; left unlocated when nothing fits."""
    if rec.kind != "tokens":
        return rec
    axes = rec.axes if rec.axes is not None else tuple(range(len(spatial_shape)))
    shape = tuple(spatial_shape[a] for a in axes)
    n_q, n_k = rec.probs.shape[-2:]
    q_grid, k_grid, q_pre, k_pre = rec.query_grid, rec.key_grid, rec.query_prefix, rec.key_prefix
    # sequences grouped into the batch (windows, frames) are found only along given axes
    grouped = batch is not None and rec.probs.shape[0] != batch and rec.axes is None
    if q_grid is None and not grouped:
        found = _infer(shape, n_q, q_pre)
        if found is None:
            return rec
        q_pre, q_grid = found
    if q_grid is None:
        return rec
    q_pre = n_q - _count(q_grid) if q_pre is None else q_pre
    if k_grid is None:
        if n_k == n_q and (k_pre is None or k_pre == q_pre):
            k_pre, k_grid = q_pre, q_grid
        else:
            found = _infer(shape, n_k, k_pre)
            if found is None:
                return rec
            k_pre, k_grid = found
    k_pre = n_k - _count(k_grid) if k_pre is None else k_pre
    if q_pre + _count(q_grid) != n_q or k_pre + _count(k_grid) != n_k:
        raise ValueError(f"{rec.name}: the recorded grids do not match {n_q} queries and {n_k} keys")
    tiled = rec.tiled_grid
    if tiled is None and rec.tiles is not None and q_grid:
        tiled = tuple(g * rec.tiles[a] for g, a in zip(q_grid, axes))
    if tiled is None:  # the queries span the input: keys too
        q_stride = tuple(s / g for s, g in zip(shape, q_grid)) if q_grid else ()
        k_stride = tuple(s / g for s, g in zip(shape, k_grid))
    else:
        q_stride = tuple(s / g for s, g in zip(shape, tiled))
        steps = rec.key_step or tuple(qg / kg for qg, kg in zip(q_grid, k_grid))
        k_stride = tuple(st * f for st, f in zip(q_stride, steps))
    return replace(
        rec,
        tiled_grid=tiled,
        query_grid=q_grid,
        key_grid=k_grid,
        query_prefix=q_pre,
        key_prefix=k_pre,
        axes=axes,
        query_stride=q_stride,
        key_stride=k_stride,
    )


def attention_maps(model: nn.Module, x: torch.Tensor, square: bool = True) -> list[torch.Tensor]:
    """The weights of every attention call of `model(x)`, in call order, without gradients.

    Args:
        model: The model.
        x: Its input.
        square: Keep only self-attention over the whole sequence (N_q == N_k), not class
            or cross attention.
    """
    with torch.no_grad(), capture_attention(model) as records:
        model(x)
    return [r.probs for r in records if not square or r.probs.shape[-2] == r.probs.shape[-1]]
