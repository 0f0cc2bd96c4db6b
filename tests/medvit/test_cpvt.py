"""CPVT: the positional encoding generator, any input size, GAP head, the common interface.

timm has no CPVT (its Twins models use the PEG inside a pyramid), so behaviour is tested.
"""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers.peg import PEG

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=32, num_classes=5)


def cpvt(**kw):
    return medvit.create_model("cpvt_tiny", **{**TINY, **kw}).eval()


def _deit_count(dim: int, class_token: bool = True, pos_table: bool = True, classes: int = 1000) -> int:
    """Parameters of a DeiT (patch 16 at 224, 12 blocks, MLP ratio 4, q/k/v bias), by hand."""
    block = 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + 2 * (4 * dim * dim) + 5 * dim
    tokens = dim * class_token + 197 * dim * pos_table
    return (3 * 16 * 16 * dim + dim) + tokens + 12 * block + 2 * dim + dim * classes + classes


# (name, width, #params published with the paper)
CPVT_VARIANTS = (("cpvt_tiny", 192, 6), ("cpvt_small", 384, 22), ("cpvt_base", 768, 86))


def test_parameter_counts_are_deit_with_a_peg_for_the_position_table() -> None:
    # The hand count reproduces DeiT-Ti/S/B (timm's deit_*_patch16_224 have exactly these).
    assert [_deit_count(w) for _, w, _ in CPVT_VARIANTS] == [5_717_416, 22_050_664, 86_567_656]
    for name, width, _ in CPVT_VARIANTS:
        with torch.device("meta"):
            m = medvit.create_model(name, num_classes=1000)
        # CPVT-GAP: no position table and no class token; one PEG (3x3 depthwise conv + bias)
        peg = width * 9 + width
        assert sum(p.numel() for p in m.parameters()) == _deit_count(width, False, False) + peg, name
        assert m.pos_embed is None and m.cls_token is None
        assert m.pos_block.proj.groups == m.embed_dim == width and m.pos_block.proj.kernel_size == (3, 3)


def test_parameter_counts_match_the_published_table() -> None:
    # Chu et al. (ICLR 2023, arXiv:2102.10882), the table of model variants: CPVT-Ti/S/B 6M /
    # 22M / 86M (DeiT's sizes), given to 1M; CPVT-S and CPVT-B are quoted so by later papers.
    for name, _, published in CPVT_VARIANTS:
        with torch.device("meta"):
            n = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert abs(n / 1e6 - published) <= 0.5, (name, n)


@torch.no_grad()
def test_peg_gives_border_tokens_their_position() -> None:
    torch.manual_seed(0)
    peg = PEG(2, 8)
    x = torch.ones(1, 1 + 25, 8)  # class token + a 5x5 grid of identical tokens
    y = peg(x, (5, 5), num_prefix_tokens=1)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # the class token is not on the grid
    grid = y[0, 1:].reshape(5, 5, 8)
    # identical interior tokens stay identical; zero padding marks the border ones
    torch.testing.assert_close(grid[1:4, 1:4], grid[2, 2].expand(3, 3, 8))
    assert not torch.allclose(grid[0, 0], grid[2, 2]) and not torch.allclose(grid[0, 0], grid[0, 2])


@torch.no_grad()
def test_peg_is_translation_equivariant_and_follows_the_grid() -> None:
    torch.manual_seed(0)
    peg = PEG(2, 4)
    fmap = torch.zeros(1, 4, 8, 8)
    fmap[:, :, 3, 3] = torch.randn(4)
    shifted = torch.roll(fmap, shifts=(2, 1), dims=(2, 3))
    out = peg(fmap.flatten(2).transpose(1, 2), (8, 8)).transpose(1, 2).reshape(1, 4, 8, 8)
    out_s = peg(shifted.flatten(2).transpose(1, 2), (8, 8)).transpose(1, 2).reshape(1, 4, 8, 8)
    torch.testing.assert_close(torch.roll(out, shifts=(2, 1), dims=(2, 3)), out_s)
    # the impulse spreads only to its 3x3 neighbourhood on the grid (bias response removed)
    bias_only = peg(torch.zeros(1, 64, 4), (8, 8)).transpose(1, 2).reshape(1, 4, 8, 8)
    changed = ((out - bias_only).abs().sum(1)[0] > 0).nonzero().tolist()
    assert sorted(changed) == [[r, c] for r in (2, 3, 4) for c in (2, 3, 4)]


@torch.no_grad()
def test_any_input_size_without_a_position_table() -> None:
    m = cpvt()
    for size, grid in (((32, 32), (2, 2)), ((48, 64), (3, 4)), ((96, 32), (6, 2))):
        x = torch.randn(2, 3, *size)
        assert m(x).shape == (2, 5)
        feats = m.forward_intermediates(x, [0, 2], intermediates_only=True)
        assert [f.shape for f in feats] == [(2, 32, *grid)] * 2
    strict = cpvt(dynamic_img_size=False)
    with pytest.raises(ValueError, match="does not match"):
        strict(torch.randn(1, 3, 48, 48))


@torch.no_grad()
def test_peg_follows_the_first_block_and_matters() -> None:
    m = cpvt(num_classes=0)
    x = torch.randn(2, 3, 48, 32)
    tokens, grid = m.embed(x)
    y = m.pos_block(m.blocks[0](tokens), grid)
    expected = m.norm(m.blocks[2](m.blocks[1](y)))
    torch.testing.assert_close(m.forward_features(x), expected)
    # GAP head: the normed tokens averaged
    torch.testing.assert_close(m(x), expected.mean(1))
    before = m(x)
    m.pos_block.proj.weight.mul_(2.0)
    assert not torch.allclose(m(x), before)


@torch.no_grad()
def test_volumes_of_any_size() -> None:
    m = cpvt(img_size=16, patch_size=8, spatial_dims=3, in_chans=1, num_classes=0)
    x = torch.randn(1, 1, 16, 24, 32)
    assert m(x).shape == (1, 32)
    assert m.forward_intermediates(x, [1], intermediates_only=True)[0].shape == (1, 32, 2, 3, 4)
    assert m.pos_block.proj.kernel_size == (3, 3, 3)


def test_common_interface_and_class_token_variant() -> None:
    m = cpvt()
    x = torch.randn(2, 3, 32, 32)
    final, feats = m.forward_intermediates(x)
    assert len(feats) == 3 and feats[0].shape == (2, 32, 2, 2)
    torch.testing.assert_close(final, m.forward_features(x))
    normed = m.forward_intermediates(x, [-1], norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(normed[0], final)
    assert len(m.attention_maps(x)) == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    with pytest.raises(ValueError, match="class token"):
        m.reset_classifier(3, global_pool="token")
    tok = cpvt(global_pool="token")
    assert tok.num_prefix_tokens == 1 and tok(x).shape == (2, 5)
    assert tok.forward_intermediates(x, [0], intermediates_only=True)[0].shape == (2, 32, 2, 2)
    assert cpvt(global_pool="map")(x).shape == (2, 5)
    frozen = cpvt(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())
    assert frozen.pos_block.proj.weight.requires_grad


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="peg_index"):
        cpvt(peg_index=3)
    with pytest.raises(ValueError, match="no position table"):
        cpvt(pos_embed="learn")
    with pytest.raises(ValueError, match="odd"):
        cpvt(peg_kernel=4)
    with pytest.raises(ValueError, match="does not divide"):
        cpvt()(torch.randn(1, 3, 40, 32))
