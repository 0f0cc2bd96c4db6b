"""CeiT: the I2T stem, LeFF on the token grid, layer-wise class-token attention, interface.

timm has no CeiT; its mechanisms are tested against direct computations instead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import medvit
from medvit.layers.conv_ffn import ConvFeedForward
from medvit.layers.hybrid_embed import HybridEmbed

TINY = dict(embed_dim=32, depth=3, num_heads=2, img_size=32, stem_width=8, num_classes=5)


def ceit(**kw):
    return medvit.create_model("ceit_tiny", **{**TINY, **kw}).eval()


def _official_count(dim: int, depth: int = 12, classes: int = 1000) -> int:
    """Parameters of the official CeiT (I2T stem, LeFF with BN, one LCA block), by hand."""
    hidden = 4 * dim
    i2t = 3 * 64 * 7 * 7 + 2 * 64 + (64 * dim * 4 * 4 + dim)  # conv 7x7 (no bias) + BN, 4x4 patches
    attn = 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim)  # norm + q/k/v (bias) + proj
    leff = (dim * hidden + hidden) + 2 * hidden + 10 * hidden + 2 * hidden + (hidden * dim + dim) + 2 * dim
    lca = attn + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)  # attention + plain MLP
    tokens = dim + 197 * dim + depth * dim  # class token, position table, layer-wise class positions
    return i2t + tokens + depth * (attn + 2 * dim + leff) + lca + 2 * dim + dim * classes + classes


# (name, width, #params published with the paper)
CEIT_VARIANTS = (("ceit_tiny", 192, 6.4), ("ceit_small", 384, 24.2))


def test_parameter_counts_are_the_official_configurations() -> None:
    # The hand count equals the official ceit_tiny/small/base_patch16_224 (coeusguo/ceit,
    # ceit_model.py) instantiated: 6,356,904 / 24,204,840 / 94,405,416.
    assert [_official_count(d) for d in (192, 384, 768)] == [6_356_904, 24_204_840, 94_405_416]
    for name, width, _ in CEIT_VARIANTS:
        with torch.device("meta"):
            n = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert n == _official_count(width), name


def test_parameter_counts_match_the_published_table() -> None:
    # Yuan et al. (ICCV 2021, arXiv:2103.11816), Table 1 (CeiT variants), and the official
    # README's model zoo: CeiT-T 6.4M, CeiT-S 24.2M, given to 0.1M.
    for name, _, published in CEIT_VARIANTS:
        with torch.device("meta"):
            n = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert abs(n / 1e6 - published) <= 0.05, (name, n)


def test_image_to_tokens_stem() -> None:
    with torch.device("meta"):
        m = medvit.create_model("ceit_tiny")
    assert isinstance(m.patch_embed, HybridEmbed)
    stem = m.patch_embed.backbone
    assert stem.conv.kernel_size == (7, 7) and stem.conv.stride == (2, 2) and stem.conv.bias is None
    assert stem.maxpool.stride == 2 and stem.num_features == 64
    # patches of 4 on the quarter-resolution map: 14 x 14 tokens at 224, as DeiT
    assert m.patch_embed.proj.kernel_size == (4, 4) and m.grid_size == (14, 14)
    assert m.pos_embed.shape == (1, 197, 192)


@torch.no_grad()
def test_leff_restores_the_token_grid() -> None:
    torch.manual_seed(0)
    leff = ConvFeedForward(2, 8, 16, grid_size=(5, 6), num_prefix_tokens=1).eval()
    x = torch.randn(1, 1 + 30, 8)
    base = leff(x)
    # the class token is passed through (CeiT's block then adds its normed self)
    torch.testing.assert_close(base[:, 0], x[:, 0])
    # perturbing patch token (row 2, col 3) of the 5 x 6 grid changes exactly its 3x3
    # neighbourhood: the tokens were put back on their grid in row-major order
    y = x.clone()
    y[:, 1 + 2 * 6 + 3] += 1.0
    changed = ((leff(y) - base)[0, 1:].abs().sum(-1) > 1e-6).reshape(5, 6).nonzero().tolist()
    assert sorted(changed) == [[r, c] for r in (1, 2, 3) for c in (2, 3, 4)]
    with pytest.raises(ValueError, match="do not fit"):
        leff(torch.randn(1, 26, 8))


@torch.no_grad()
def test_leff_is_expand_depthwise_project() -> None:
    torch.manual_seed(0)
    leff = ConvFeedForward(2, 8, 16, grid_size=(4, 4), num_prefix_tokens=1).eval()
    x = torch.randn(2, 17, 8)
    fmap = x[:, 1:].transpose(1, 2).reshape(2, 8, 4, 4)
    y = F.gelu(leff.bn1(F.conv2d(fmap, leff.conv1.weight, leff.conv1.bias)))
    y = F.gelu(leff.bn2(F.conv2d(y, leff.conv2.weight, leff.conv2.bias, padding=1, groups=16)))
    y = leff.bn3(F.conv2d(y, leff.conv3.weight, leff.conv3.bias))
    torch.testing.assert_close(leff(x)[:, 1:], y.flatten(2).transpose(1, 2))


@torch.no_grad()
def test_layer_wise_class_token_attention() -> None:
    m = ceit()
    x = torch.randn(2, 3, 32, 32)
    tokens, _ = m.embed(x)
    cls = []
    for blk in m.blocks:
        tokens = blk(tokens)
        cls.append(tokens[:, 0])
    stack = torch.stack(cls, dim=1) + m.pos_layer_embed  # (B, depth, D)
    # LCA by hand: only the last class token queries the class tokens of all blocks
    lca = m.lca
    h = lca.norm1(stack)
    d, heads = h.shape[-1], lca.attn.num_heads
    q, k, v = F.linear(h, lca.attn.qkv.weight, lca.attn.qkv.bias).split(d, dim=-1)
    q = q[:, -1:].reshape(2, 1, heads, -1).transpose(1, 2)
    k, v = (t.reshape(2, len(cls), heads, -1).transpose(1, 2) for t in (k, v))
    att = ((q @ k.transpose(-2, -1)) * lca.attn.scale).softmax(-1) @ v
    c = stack[:, -1] + lca.attn.proj(att.transpose(1, 2).reshape(2, d))
    c = c + lca.mlp(lca.norm2(c))
    feats = m.forward_features(x)
    torch.testing.assert_close(feats[:, 0], m.norm(c))
    torch.testing.assert_close(feats[:, 1:], m.norm(tokens[:, 1:]))
    no_lca = ceit(lca=False)
    assert no_lca.lca is None and no_lca.pos_layer_embed is None


def test_common_interface() -> None:
    m = ceit()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 5)
    final, feats = m.forward_intermediates(x, indices=[0, 2])
    assert [f.shape for f in feats] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    nlc = m.forward_intermediates(x, 2, output_fmt="NLC", intermediates_only=True, stop_early=True)
    assert [f.shape for f in nlc] == [(2, 4, 32)] * 2
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    torch.testing.assert_close(m(x), final[:, 0])
    m.reset_classifier(4, global_pool="avg")
    assert m(x).shape == (2, 4)
    assert ceit(global_pool="map")(x).shape == (2, 5)
    frozen = ceit(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.proj.parameters())
    assert frozen.patch_embed.backbone.conv.weight.requires_grad
    frozen.train()(x).sum().backward()
    assert frozen.lca.attn.qkv.weight.grad is not None and frozen.pos_layer_embed.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        ceit(img_size=40)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        ceit(dynamic_img_size=True)
    with pytest.raises(ValueError, match="class token"):
        ceit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="odd"):
        ceit(leff_kernel=2)
    with pytest.raises(ValueError, match="does not match"):
        ceit()(torch.randn(1, 3, 48, 48))
