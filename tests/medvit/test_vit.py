"""ViT behaviour: the common interface, heads, position embeddings, 3D."""

from __future__ import annotations

import pytest
import torch

import medvit

TINY = dict(embed_dim=32, depth=4, num_heads=2, img_size=32, patch_size=8)


def vit(**kw):
    return medvit.create_model("vit_base_patch16_224", **{**TINY, **kw}).eval()


def test_num_classes_zero_returns_pooled_features() -> None:
    m = vit(num_classes=0)
    out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, m.num_features)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(m(x), m.forward_features(x)[:, 0])


def test_forward_is_features_then_head() -> None:
    m = vit(num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 16, 32)
    torch.testing.assert_close(m(x), m.forward_head(feats))
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])


def test_forward_intermediates_indices_and_formats() -> None:
    m = vit()
    x = torch.randn(2, 3, 32, 32)
    final, feats = m.forward_intermediates(x, indices=[0, 3])
    assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    last2 = m.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert [f.shape for f in last2] == [(2, 16, 32)] * 2
    # the last intermediate with norm=True is the patch part of forward_features
    normed = m.forward_intermediates(x, [-1], norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(normed[0], final[:, 1:])
    early = m.forward_intermediates(x, [1], intermediates_only=True, stop_early=True)
    full = m.forward_intermediates(x, [1], intermediates_only=True)
    torch.testing.assert_close(early[0], full[0])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, [4])
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, [1], output_fmt="NHWC")


def test_map_avg_and_reset_classifier() -> None:
    x = torch.randn(2, 3, 32, 32)
    gap = vit(global_pool="avg", class_token=False, num_classes=3)
    assert gap(x).shape == (2, 3) and gap.num_prefix_tokens == 0
    assert isinstance(gap.norm, torch.nn.Identity)  # fc_norm after pooling, as timm
    mapped = vit(global_pool="map", class_token=False, num_classes=3)
    assert mapped(x).shape == (2, 3)
    mapped.reset_classifier(7)
    assert mapped(x).shape == (2, 7)
    mapped.reset_classifier(0, global_pool="")
    assert mapped(x).shape == (2, 16, 32)
    with pytest.raises(ValueError, match="class_token"):
        vit(global_pool="token", class_token=False)


def test_frozen_patch_embed_and_sincos() -> None:
    m = vit(freeze_patch_embed=True, pos_embed="sincos")
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    assert "pos_embed" not in dict(m.named_parameters())
    m(torch.randn(1, 3, 32, 32)).sum().backward()


def test_dynamic_img_size_resamples_position_embedding() -> None:
    m = vit(dynamic_img_size=True, num_classes=0, global_pool="")
    out = m(torch.randn(1, 3, 48, 64))
    assert out.shape == (1, 1 + 6 * 8, 32)
    strict = vit()
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        strict(torch.randn(1, 3, 48, 48))


@torch.no_grad()
def test_attention_maps() -> None:
    m = vit()
    x = torch.randn(1, 3, 32, 32)
    maps = m.attention_maps(x)
    assert len(maps) == 4 and maps[0].shape == (1, 2, 17, 17)
    # each row is a softmax over the keys
    for a in maps:
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))
    # the first map is softmax(q k^T / sqrt(d)) of the embedded tokens, computed by hand
    tokens, _ = m.embed(x)
    blk = m.blocks[0]
    q, k, _ = blk.attn.qkv(blk.norm1(tokens)).reshape(1, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    torch.testing.assert_close(maps[0], (q @ k.transpose(-2, -1) / 4.0).softmax(-1), atol=1e-5, rtol=0)
    # the explicit softmax that yields the maps computes what the fused attention of forward does
    y = tokens
    for b in m.blocks:
        y, _ = b(y, return_attn=True)
    torch.testing.assert_close(m.norm(y), m.forward_features(x), atol=1e-5, rtol=0)


def test_3d_vit_on_volumes() -> None:
    m = medvit.create_model("vit_small_patch16_96_3d", img_size=32, depth=2, embed_dim=48, num_heads=3)
    x = torch.randn(2, 1, 32, 32, 32)
    feats = m.forward_intermediates(x, [0, 1], intermediates_only=True)
    assert feats[0].shape == (2, 48, 2, 2, 2)
    assert m(x).shape == (2, 48)  # num_classes=0 by default in 3D: pooled features
    assert m.spatial_dims == 3
