"""CrossViT: parity with timm (both branches, the 224/240 resize, crops), the interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm
from medvit.layers.cross_attention import CrossAttentionBlock

from helpers import require


# 120 px keeps the real 224/240 scale: 10 x 10 tokens of 12 px, 112 px resized -> 7 x 7 of 16 px
SMALL = dict(img_size=120, embed_dim=(24, 48), num_heads=(2, 4), depth=((1, 2, 0), (1, 1, 0)), num_classes=7)


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    timm = require("timm")
    ref = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():  # timm zero-initialises some tensors; make every one count
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def crossvit(**kw) -> torch.nn.Module:
    return medvit.create_model("crossvit_tiny_240", **{**SMALL, **kw}).eval()


@torch.no_grad()
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        dict(global_pool="avg", crop_scale=True),
        dict(depth=((1, 1, 2), (2, 1, 1)), qkv_bias=False),  # stacked cross-attention fusions
    ],
)
def test_timm_parity_small(kwargs) -> None:
    ref = _perturbed("crossvit_tiny_240", **{**SMALL, **kwargs})
    ours = load_timm(crossvit(**kwargs), ref.state_dict()).eval()
    x = torch.randn(2, 3, 120, 120)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    final, feats = ours.forward_intermediates(x)
    ref_final, ref_feats = ref.forward_intermediates(x)
    assert len(feats) == len(ref_feats) == 4
    for a, b in zip(final + feats, ref_final + ref_feats):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_full_size_tiny() -> None:
    ref = _perturbed("crossvit_tiny_240")
    ours = load_timm(medvit.create_model("crossvit_tiny_240"), ref.state_dict()).eval()
    assert ours.img_size_scaled == [(240, 240), (224, 224)]
    x = torch.randn(1, 3, 240, 240)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    names = medvit.list_models("crossvit_*")
    assert {"crossvit_tiny_240", "crossvit_small_240", "crossvit_base_240"} <= set(names)
    for name in names:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


def test_paper_configuration() -> None:
    with torch.device("meta"):
        m = medvit.create_model("crossvit_base_240")
    assert m.embed_dim == (384, 768) and len(m.blocks) == 3
    assert [len(b) for b in m.blocks[0].blocks] == [1, 4]
    assert m.grid_sizes == [(20, 20), (14, 14)]
    # the small branch's class token is fused at the large branch's width, and back
    assert m.blocks[0].fusion[0].attn.q.in_features == 768
    assert m.blocks[0].revert_projs[0][2].out_features == 384


def test_cross_attention_block_updates_only_the_first_token() -> None:
    block = CrossAttentionBlock(16, 2, qkv_bias=True).eval()
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    attn = block.attn
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]))
        ref.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.k.bias, attn.v.bias]))
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    x = torch.randn(2, 9, 16)
    y = block.norm1(x)
    expected = x[:, :1] + ref(y[:, :1], y, y)[0]
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=0)


def test_interface() -> None:
    m = crossvit()
    x = torch.randn(2, 3, 120, 120)
    feats = m.forward_features(x)
    assert [f.shape for f in feats] == [(2, 1 + 100, 24), (2, 1 + 49, 48)]
    torch.testing.assert_close(m(x), m.forward_head(feats))
    pooled = m.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(pooled, torch.cat([feats[0][:, 0], feats[1][:, 0]], dim=1))
    # index b * blocks + i: branch b after multi-scale block i
    maps = m.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [f.shape for f in maps] == [(2, 24, 10, 10), (2, 48, 7, 7)]
    nlc = m.forward_intermediates(x, indices=[0, 2], output_fmt="NLC", norm=True, intermediates_only=True)
    assert [f.shape for f in nlc] == [(2, 100, 24), (2, 49, 48)]
    early = m.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
    full = m.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    for a, b in zip(early, full):
        torch.testing.assert_close(a, b)
    last = m.forward_intermediates(x, indices=[1, 3], norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(last[1], feats[1][:, 1:])
    m.reset_classifier(3, global_pool="avg")
    assert m(x).shape == (2, 3)
    m.reset_classifier(0)
    assert m(x).shape == (2, 72)
    assert (m.num_features, m.spatial_dims, m.in_chans, m.img_size) == (72, 2, 3, (120, 120))
    assert crossvit(num_classes=0)(x).shape == (2, 72)


def test_freeze_patch_embed() -> None:
    m = crossvit(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    m(torch.randn(1, 3, 120, 120)).sum().backward()
    assert m.pos_embed_1.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("crossvit_tiny_240", img_size=224)  # the 16 px branch gets 209 px
    with pytest.raises(ValueError, match="one value per branch"):
        crossvit(num_heads=(2, 4, 4))
    with pytest.raises(ValueError, match="depth entry"):
        crossvit(depth=((1, 2),))
    with pytest.raises(ValueError, match="global_pool"):
        crossvit(global_pool="map")
    with pytest.raises(ValueError, match="expected input"):
        crossvit()(torch.randn(1, 3, 240, 240))
