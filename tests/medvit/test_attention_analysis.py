"""Mean attention distance and attention rollout on hand-built attention with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from medvit.analysis import attention_rollout, mean_attention_distance, token_positions
from medvit.layers.attention_capture import AttentionRecord


def _record(probs: torch.Tensor, grid: tuple[int, ...], stride: tuple[float, ...], prefix: int = 0, **kw) -> AttentionRecord:
    fields = {
        "name": "blk", "probs": probs, "query_grid": grid, "key_grid": grid, "query_prefix": prefix,
        "key_prefix": prefix, "axes": tuple(range(len(grid))), "query_stride": stride, "key_stride": stride,
    }
    return AttentionRecord(**{**fields, **kw})


def test_token_positions_are_cell_centres() -> None:
    pos = token_positions((2, 3), (4.0, 2.0))
    assert pos.tolist() == [[2, 1], [2, 3], [2, 5], [6, 1], [6, 3], [6, 5]]


def test_each_query_two_tokens_away_is_two_patches_in_mm() -> None:
    n, patch, spacing = 8, 16.0, 0.75
    a = torch.zeros(1, 1, n, n)
    for i in range(n):
        a[0, 0, i, i + 2 if i + 2 < n else i - 2] = 1.0
    rec = _record(a, (n,), (patch,))
    assert mean_attention_distance(rec).tolist() == pytest.approx([2 * patch])
    assert mean_attention_distance(rec, [spacing]).tolist() == pytest.approx([2 * patch * spacing])


def test_uniform_attention_on_a_two_by_two_grid_with_a_class_token() -> None:
    # every query gives the class token 0.2 and each patch 0.2: prefix left out, renormalised
    a = torch.full((1, 2, 5, 5), 0.2)
    rec = _record(a, (2, 2), (1.0, 1.0), prefix=1)
    # from any cell: itself (0), two neighbours (1 each) and the diagonal (sqrt 2)
    assert mean_attention_distance(rec).tolist() == pytest.approx([(2 + math.sqrt(2)) / 4] * 2)
    # anisotropic pixels: neighbours 2 mm and 3 mm away, the diagonal sqrt(13) mm
    assert mean_attention_distance(rec, (2.0, 3.0)).tolist() == pytest.approx([(5 + math.sqrt(13)) / 4] * 2)


def test_heads_and_the_keys_of_a_halo_are_kept_apart() -> None:
    # two queries on a 1D grid of 10 px cells; keys: the queries' block with one token of halo
    # on each side, so key j lies at (j - 1) query cells; head 0 looks at its own cell, head 1
    # at the left halo token
    a = torch.zeros(1, 2, 2, 4)
    a[0, 0, 0, 1] = a[0, 0, 1, 2] = 1.0
    a[0, 1, :, 0] = 1.0
    rec = _record(a, (2,), (10.0,), key_grid=(4,), key_offset=(-1.0,))
    assert mean_attention_distance(rec).tolist() == pytest.approx([0.0, (10.0 + 20.0) / 2])


def test_records_without_positions_are_refused() -> None:
    with pytest.raises(ValueError, match="no token positions"):
        mean_attention_distance(AttentionRecord("xca", torch.full((1, 1, 4, 4), 0.25), kind="channel"))


def test_rollout_of_two_layers_by_hand() -> None:
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    recs = [_record(a[None, None], (2,), (1.0,)) for a in (a1, a2)]
    # A1' = [[1, 0], [.25, .75]], A2' = [[.75, .25], [0, 1]]; rollout = A2' A1'
    expected = torch.tensor([[0.8125, 0.1875], [0.25, 0.75]])
    torch.testing.assert_close(attention_rollout(recs)[0], expected)
    # one layer is that layer with its residual
    torch.testing.assert_close(attention_rollout(recs[:1])[0], torch.tensor([[1.0, 0.0], [0.25, 0.75]]))


def test_rollout_head_fusion_and_discarding() -> None:
    heads = torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])])[None]
    rec = _record(heads, (2,), (1.0,))
    # mean: 0.5 everywhere, then half of it and half the identity
    torch.testing.assert_close(attention_rollout([rec], "mean")[0], torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    # max: [[1, 1], [1, 1]] + the identity, rows renormalised
    torch.testing.assert_close(attention_rollout([rec], "max")[0], torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    # discarding the weakest third of a 3 x 3 map zeroes its three smallest off-diagonal weights
    a = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.25, 0.05, 0.7]])
    out = attention_rollout([_record(a[None, None], (3,), (1.0,))], discard_ratio=1 / 3)[0]
    kept = torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.6, 0.3], [0.25, 0.0, 0.7]]) * 0.5 + 0.5 * torch.eye(3)
    torch.testing.assert_close(out, kept / kept.sum(-1, keepdim=True))


def test_rollout_refuses_layers_over_different_tokens() -> None:
    recs = [_record(torch.full((1, 1, n, n), 1 / n), (n,), (1.0,)) for n in (4, 2)]
    with pytest.raises(ValueError, match="same tokens"):
        attention_rollout(recs)
    with pytest.raises(ValueError, match="head_fusion"):
        attention_rollout(recs[:1], "median")
