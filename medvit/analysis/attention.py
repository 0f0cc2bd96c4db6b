"""Attention rollout (Abnar & Zuidema, 2020) and mean attention distance (Dosovitskiy et al., 2021).

Both read the records of `medvit.layers.attention_capture.capture_attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medvit.layers.attention_capture import AttentionRecord

HEAD_FUSIONS = ("mean", "max", "min")


def token_positions(
    grid: Sequence[int], stride: Sequence[float], offset: Sequence[float] | None = None
) -> torch.Tensor:
    """Centres of the cells of a token grid in input pixels, `(prod(grid), len(grid))`, row-major.

    Args:
        grid: Tokens along each axis.
        stride: Input pixels per token along each axis.
        offset: Where the first cell starts, in pixels (0 when None).
    """
    offset = offset if offset is not None else [0.0] * len(grid)
    axes = [(torch.arange(g, dtype=torch.float64) + 0.5) * s + o for g, s, o in zip(grid, stride, offset)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def mean_attention_distance(record: AttentionRecord, spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Mean attention distance of each head, `(heads,)`: sum_j A_ij ||p_i - p_j||, averaged over
    the queries (and the batch), as Fig. 7 of the ViT paper.

    Positions are token-cell centres in input pixels times `spacing` (mm per pixel / voxel
    along each input axis), so the result is in mm, or in pixels when `spacing` is None.
    Prefix (class / distillation) tokens are left out on both sides, and each query's
    weights over the patch keys are renormalised to sum to 1.

    Args:
        record: A located record (`record.located`).
        spacing: Physical size of one input pixel along every spatial axis of the input.

    Raises:
        ValueError: The record has no token positions (channel attention, a class-token
            query, tokens pooled in 1D), or `spacing` does not fit the input.
    """
    if not record.located:
        raise ValueError(
            f"{record.name}: attention of kind {record.kind!r} over "
            f"{tuple(record.probs.shape[-2:])} tokens has no token positions, so no distance"
        )
    axes, q_grid, k_grid = record.axes or (), record.query_grid or (), record.key_grid or ()
    q_stride, k_stride = record.query_stride or (), record.key_stride or ()
    if spacing is None:
        scale = torch.ones(len(axes), dtype=torch.float64)
    else:
        if max(axes) >= len(spacing):
            raise ValueError(f"{record.name}: spacing {tuple(spacing)} does not cover input axes {axes}")
        scale = torch.tensor([float(spacing[a]) for a in axes], dtype=torch.float64)
    offset = None
    if record.key_offset is not None:
        offset = [o * s for o, s in zip(record.key_offset, q_stride)]
    pos_q = token_positions(q_grid, q_stride) * scale
    pos_k = token_positions(k_grid, k_stride, offset) * scale
    dist = torch.cdist(pos_q, pos_k)  # (Nq, Nk)
    probs = record.probs[..., record.query_prefix :, record.key_prefix :].double()
    mass = probs.sum(dim=-1, keepdim=True)
    probs = probs / mass.clamp_min(torch.finfo(torch.float64).tiny)
    per_query = (probs * dist.to(probs.device)).sum(dim=-1)  # (B', heads, Nq)
    return per_query.mean(dim=(0, 2)).float().cpu()


def _fuse(probs: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if head_fusion == "mean":
        return probs.mean(dim=1)
    if head_fusion == "max":
        return probs.amax(dim=1)
    return probs.amin(dim=1)


def attention_rollout(
    records: Sequence[AttentionRecord], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout: how much each input token flows into each output token, `(B, N, N)`.

    Per layer the heads are fused, the weakest `discard_ratio` of each map's weights are
    zeroed (never the diagonal), the residual is added as `A' = 0.5 A + 0.5 I` and rows are
    renormalised; the rollout is the product `A'_L ... A'_2 A'_1`. Row `i` of the result is
    the attribution of output token `i` (the class token, or the centre query) to the inputs.

    Args:
        records: Self-attention records of successive layers over the same tokens, `(B, h, N, N)`.
        head_fusion: `mean`, `max` or `min` over the heads.
        discard_ratio: Fraction in [0, 1) of each fused map's weights set to zero.

    Raises:
        ValueError: No records, records over different tokens, or a bad fusion / ratio.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    if not records:
        raise ValueError("attention rollout needs at least one attention record")
    shape = records[0].probs.shape
    rollout = None
    for rec in records:
        if rec.probs.shape != shape or shape[-1] != shape[-2]:
            raise ValueError(
                f"{rec.name}: rollout needs self-attention over the same tokens in every layer, "
                f"got {tuple(rec.probs.shape)} after {tuple(shape)}"
            )
        a = _fuse(rec.probs.double(), head_fusion)
        n = a.shape[-1]
        eye = torch.eye(n, dtype=a.dtype, device=a.device)
        if discard_ratio > 0:
            k = int(discard_ratio * n * n)
            if k:
                flat = a.masked_fill(eye.bool(), float("inf")).flatten(1)
                low = flat.topk(k, dim=-1, largest=False).indices
                a = a.flatten(1).scatter(1, low, 0.0).view_as(a)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout.float()  # type: ignore[union-attr]
