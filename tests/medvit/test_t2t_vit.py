"""T2T-ViT: soft splits and their token counts, T2T layers, sequence sin-cos, interface.

timm has no T2T-ViT; the module is checked against the paper's token arithmetic.
"""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers import sincos_pos_embed
from medvit.models.image.t2t_vit import T2TModule, TokenTransformer

TINY = dict(embed_dim=32, depth=2, num_heads=2, token_dim=8, img_size=32, num_classes=5)


def t2t(**kw):
    return medvit.create_model("t2t_vit_14", **{**TINY, **kw}).eval()


def _official_count(dim: int, depth: int, token_dim: int = 64, classes: int = 1000) -> tuple[int, int]:
    """(trainable, total) parameters of the official T2T-ViT_t (transformer T2T layers), by hand.

    The total adds the fixed sin-cos table, a frozen Parameter in the official code.
    """

    def t2t_layer(d: int) -> int:  # 1 head, q/k/v to token_dim without bias, MLP ratio 1
        return 2 * d + d * 3 * token_dim + (token_dim**2 + token_dim) + 2 * token_dim + 2 * (token_dim**2 + token_dim)

    hidden = 3 * dim  # MLP ratio 3
    block = 2 * dim + dim * 3 * dim + (dim * dim + dim) + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    t2t = t2t_layer(3 * 7 * 7) + t2t_layer(token_dim * 3 * 3) + (token_dim * 9 * dim + dim)
    trainable = t2t + dim + depth * block + 2 * dim + dim * classes + classes  # + class token, norm, head
    return trainable, trainable + 197 * dim


# (name, width, depth, heads, #params published with the paper)
T2T_VARIANTS = (
    ("t2t_vit_14", 384, 14, 6, 21.5),
    ("t2t_vit_19", 448, 19, 7, 39.2),
    ("t2t_vit_24", 512, 24, 8, 64.1),
)


def test_parameter_counts_are_the_official_configurations() -> None:
    # The hand count reproduces the official code (yitu-opensource/T2T-ViT, models/t2t_vit.py,
    # T2t_vit_t_14/19/24 instantiated: 21,541,070 / 39,172,942 / 64,101,454 in all, of which
    # 21,465,422 / 39,084,686 / 64,000,590 trainable).
    assert [_official_count(w, d) for _, w, d, _, _ in T2T_VARIANTS] == [
        (21_465_422, 21_541_070),
        (39_084_686, 39_172_942),
        (64_000_590, 64_101_454),
    ]
    for name, width, depth, heads, _ in T2T_VARIANTS:
        with torch.device("meta"):
            m = medvit.create_model(name, num_classes=1000)
        # the sin-cos table is a buffer here, so the parameters are the official trainable ones
        assert sum(p.numel() for p in m.parameters()) == _official_count(width, depth)[0], name
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (width, depth, heads)
        assert m.blocks[0].attn.qkv.bias is None and m.pos_embed.shape == (1, 197, width)


def test_parameter_counts_match_the_published_table() -> None:
    # The model table of the official README (yitu-opensource/T2T-ViT, "T2T-ViT Models"):
    # T2T-ViT_t-14/19/24 21.5M / 39.2M / 64.1M, given to 0.1M (an early revision listed 39.0M
    # for T2T-ViT_t-19; the code gives 39.17M). Those totals count the frozen sin-cos table (a
    # Parameter there, a buffer here), so it is added back before comparing.
    for name, width, _, _, published in T2T_VARIANTS:
        with torch.device("meta"):
            m = medvit.create_model(name, num_classes=1000)
        total = sum(p.numel() for p in m.parameters()) + m.pos_embed.numel()
        assert m.pos_embed.numel() == 197 * width
        assert abs(total / 1e6 - published) <= 0.05, (name, total)


def test_soft_split_token_counts() -> None:
    mod = T2TModule(224, 3, 384, token_dim=64)
    assert mod.soft_split_grids((224, 224)) == [(56, 56), (28, 28), (14, 14)]
    assert mod.attention1.norm1.normalized_shape == (3 * 7 * 7,)
    assert mod.attention2.norm1.normalized_shape == (64 * 3 * 3,)
    assert mod.proj.in_features == 64 * 3 * 3 and mod.grid_size == (14, 14)
    small = T2TModule(32, 3, 16, token_dim=8)
    shapes = []
    hooks = [
        layer.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
        for layer in (small.soft_split0, small.soft_split1, small.soft_split2)
    ]
    out = small(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    # overlapping unfolds: (C k^2, tokens) = (3*49, 8*8), (8*9, 4*4), (8*9, 2*2)
    assert shapes == [(2, 147, 64), (2, 72, 16), (2, 72, 4)]
    assert out.shape == (2, 4, 16)
    assert small.soft_split_grids((48, 80)) == [(12, 20), (6, 10), (3, 5)]


@torch.no_grad()
def test_t2t_layer_keeps_a_residual_through_the_values() -> None:
    torch.manual_seed(0)
    layer = TokenTransformer(27, 8).eval()
    layer.attn.proj.weight.zero_()
    layer.attn.proj.bias.zero_()
    x = torch.randn(2, 5, 27)
    v = layer.attn.qkv(layer.norm1(x))[..., 16:]
    torch.testing.assert_close(layer(x), v + layer.mlp(layer.norm2(v)))
    assert layer.attn.scale == pytest.approx(27**-0.5)  # the input width, as the official code


@torch.no_grad()
def test_sequence_sincos_position_embedding() -> None:
    m = t2t()
    assert "pos_embed" not in dict(m.named_parameters())
    torch.testing.assert_close(m.pos_embed, sincos_pos_embed((5,), 32).unsqueeze(0))
    dyn = t2t(dynamic_img_size=True, num_classes=0, global_pool="")
    out = dyn(torch.randn(1, 3, 48, 64))
    assert out.shape == (1, 1 + 12, 32)
    feats = dyn.forward_intermediates(torch.randn(1, 3, 48, 64), [1], intermediates_only=True)
    assert feats[0].shape == (1, 32, 3, 4)
    learned = t2t(pos_embed="learn")
    assert learned.pos_embed.requires_grad and learned.pos_embed.shape == (1, 5, 32)


def test_common_interface() -> None:
    m = t2t()
    x = torch.randn(2, 3, 32, 32)
    final, feats = m.forward_intermediates(x, [0, 1])
    assert [f.shape for f in feats] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    torch.testing.assert_close(m.forward_head(final), m(x))
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features)
    assert t2t(global_pool="map")(x).shape == (2, 5)
    frozen = t2t(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.proj.parameters())
    assert frozen.patch_embed.attention1.attn.qkv.weight.requires_grad


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        t2t(img_size=40)
    with pytest.raises(ValueError, match="patch_size"):
        t2t(patch_size=8)
    with pytest.raises(ValueError, match="does not match"):
        t2t()(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="4D input"):
        t2t()(torch.randn(3, 32, 32))
