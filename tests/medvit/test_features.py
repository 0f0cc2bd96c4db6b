"""The shared `forward_intermediates` helpers, and a model built on them against a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import medvit
from medvit.models._features import collect_intermediates, feature_take_last, format_intermediate


@pytest.mark.parametrize(
    ("indices", "stop_early", "only", "expected"),
    [
        (None, False, False, ([0, 1, 2, 3, 4], 4)),
        (2, True, True, ([3, 4], 4)),
        ([0, -4], True, True, ([0, 1], 1)),
        ([0, -4], True, False, ([0, 1], 4)),  # the final tokens need every block
        ([0, -4], False, True, ([0, 1], 4)),
        ([], True, True, ([], 4)),
    ],
)
def test_feature_take_last(indices, stop_early: bool, only: bool, expected) -> None:
    assert feature_take_last(5, indices, "NLC", stop_early, only) == expected


@pytest.mark.parametrize(("indices", "fmt"), [([5], "NCHW"), (6, "NLC"), (None, "NHWC")])
def test_feature_take_last_rejects(indices, fmt: str) -> None:
    with pytest.raises(ValueError):
        feature_take_last(5, indices, fmt, False, False)


def test_format_intermediate_maps_and_prefix() -> None:
    x = torch.randn(2, 1 + 6, 4)
    y = format_intermediate(x, (2, 3), "NCHW", num_prefix_tokens=1)
    assert y.shape == (2, 4, 2, 3)
    # token k of the patch part is grid position (k // 3, k % 3)
    torch.testing.assert_close(y[:, :, 1, 2], x[:, 1 + 5], rtol=0, atol=0)
    tokens, prefix = format_intermediate(x, (2, 3), "NLC", num_prefix_tokens=1, return_prefix_tokens=True)
    torch.testing.assert_close(tokens, x[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(prefix, x[:, :1], rtol=0, atol=0)
    normed = format_intermediate(x, (6,), "NLC", norm=lambda t: 2 * t, num_prefix_tokens=1)
    torch.testing.assert_close(normed, 2 * x[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="grid"):
        format_intermediate(x, (2, 2), "NCHW", num_prefix_tokens=1)


class _AddOne(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + 1


def test_collect_intermediates_runs_up_to_last() -> None:
    blocks = nn.ModuleList(_AddOne() for _ in range(4))
    x, feats = collect_intermediates(blocks, torch.zeros(1), [0, 2], 2, lambda t: 10 * t)
    assert x.item() == 3 and [f.item() for f in feats] == [10, 30]
    assert [b.calls for b in blocks] == [1, 1, 1, 0]
    state, feats = collect_intermediates(
        blocks, (torch.zeros(1), 5), [3], 3, lambda s: s[1], step=lambda blk, s: (blk(s[0]), s[1] + 1)
    )
    assert state[0].item() == 4 and feats == [9]


def test_vit_intermediates_match_a_plain_block_loop() -> None:
    m = medvit.create_model(
        "vit_base_patch16_224", embed_dim=32, depth=3, num_heads=2, img_size=32, patch_size=8
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, feats = m.forward_intermediates(x, [0, 2], norm=True, return_prefix_tokens=True)
        t, grid = m.embed(x)
        expected = []
        for i, blk in enumerate(m.blocks):
            t = blk(t)
            if i in (0, 2):
                y = m.norm(t)
                p = m.num_prefix_tokens
                expected.append((y[:, p:].transpose(1, 2).reshape(2, 32, *grid), y[:, :p]))
    assert m.num_prefix_tokens == 1
    torch.testing.assert_close(final, m.norm(t), rtol=0, atol=0)
    for (got_map, got_prefix), (map_, prefix) in zip(feats, expected, strict=True):
        torch.testing.assert_close(got_map, map_, rtol=0, atol=0)
        torch.testing.assert_close(got_prefix, prefix, rtol=0, atol=0)
