"""CaiT: talking heads, class attention, configurations and parity with timm."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm
from medvit.layers.attention_variants import TalkingHeadAttn
from medvit.layers.class_attention import ClassAttentionBlock, ClassAttn

from helpers import require


NAMES = medvit.list_models("cait_*")
SMALL = dict(img_size=32, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def cait(**kw):
    return medvit.create_model("cait_xxs24_224", **{**SMALL, **kw}).eval()


def perturb(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # zero-initialised biases and 1e-5 LayerScales must count too
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def test_registered_names_and_parameter_counts_match_timm(timm: ModuleType) -> None:
    assert NAMES == ["cait_s24_224", "cait_xs24_384", "cait_xxs24_224"]
    for name in NAMES:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


@torch.no_grad()
def test_layers_match_timm() -> None:
    timm_cait = require("timm.models.cait")
    x = torch.randn(2, 9, 32)
    ref = perturb(timm_cait.TalkingHeadAttn(32, num_heads=4, qkv_bias=True))
    ours = TalkingHeadAttn(32, num_heads=4, qkv_bias=True).eval()
    ours.load_state_dict(ref.state_dict())
    y, attn = ours(x, return_attn=True)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=0)
    assert attn.shape == (2, 4, 9, 9)
    ca_ref = perturb(timm_cait.ClassAttn(32, num_heads=4, qkv_bias=True))
    ca = ClassAttn(32, num_heads=4, qkv_bias=True).eval()
    ca.load_state_dict(ca_ref.state_dict())
    torch.testing.assert_close(ca(x), ca_ref(x), atol=1e-5, rtol=0)
    assert ca(x).shape == (2, 1, 32)


@torch.no_grad()
def test_class_attention_block_updates_only_the_class_token() -> None:
    blk = ClassAttentionBlock(32, 4, qkv_bias=True, init_values=0.5).eval()
    x, cls = torch.randn(2, 9, 32), torch.randn(2, 1, 32)
    out = blk(x, cls)
    assert out.shape == (2, 1, 32)
    # the update is a function of the patch tokens: changing them changes the class token
    assert not torch.allclose(out, blk(x.flip(2), cls))
    u = blk.attn(blk.norm1(torch.cat([cls, x], 1)))
    mid = cls + blk.ls1(u)
    torch.testing.assert_close(out, mid + blk.ls2(blk.mlp(blk.norm2(mid))))


@torch.no_grad()
@pytest.mark.parametrize("extra", [{}, dict(global_pool="avg", qkv_bias=False, init_values=0.1)])
def test_timm_parity_small(extra: dict, timm: ModuleType) -> None:
    kw = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=7, **extra)
    ref = perturb(timm.create_model("cait_xxs24_224", **kw))
    ours = load_timm(medvit.create_model("cait_xxs24_224", **kw), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    _, feats = ours.forward_intermediates(x, output_fmt="NLC")
    ref_feats = ref.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_timm_parity_full_size_xxs24(timm: ModuleType) -> None:
    ref = perturb(timm.create_model("cait_xxs24_224"))
    ours = load_timm(medvit.create_model("cait_xxs24_224"), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_checkpoint_at_another_resolution_is_resampled(timm: ModuleType) -> None:
    kw = dict(embed_dim=32, depth=1, num_heads=2, num_classes=3)
    ref = perturb(timm.create_model("cait_xxs24_224", img_size=64, **kw))
    ours = load_timm(medvit.create_model("cait_xxs24_224", img_size=96, **kw), ref.state_dict()).eval()
    ref_96 = timm.create_model("cait_xxs24_224", img_size=96, **kw).eval()
    sd = ref.state_dict()
    sd["pos_embed"] = timm.layers.resample_abs_pos_embed(sd["pos_embed"], (6, 6), num_prefix_tokens=0)
    ref_96.load_state_dict(sd)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(ours(x), ref_96(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_interface_shapes() -> None:
    m = cait()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 4, 32) and m.pos_embed.shape == (1, 4, 32)
    torch.testing.assert_close(m(x), m.head(feats[:, 0]))
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])
    final, inter = m.forward_intermediates(x, indices=[0, 2])
    assert [f.shape for f in inter] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(final, feats)
    # normed NLC of the last block is what the class-attention stage reads, normed
    last = m.forward_intermediates(x, [-1], norm=True, output_fmt="NLC", intermediates_only=True)
    assert last[0].shape == (2, 4, 32)
    assert len(m.forward_intermediates(x, 2, intermediates_only=True)) == 2
    early = m.forward_intermediates(x, [1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], m.forward_intermediates(x, [1], intermediates_only=True)[0])
    maps = m.attention_maps(x)  # talking-heads weights of the patch tokens
    assert len(maps) == 3 and maps[0].shape == (2, 2, 4, 4)


def test_uniform_drop_path_num_classes_zero_reset_and_freeze() -> None:
    m = cait(drop_path_rate=0.2, freeze_patch_embed=True, num_classes=0)
    assert {b.drop_path1.drop_prob for b in m.blocks} == {0.2}
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, m.num_features) == (2, 32)
    m.reset_classifier(4, global_pool="avg")
    assert m(x).shape == (2, 4)
    m.train()
    m(x).sum().backward()
    assert m.patch_embed.proj.weight.grad is None and m.cls_token.grad is not None


@torch.no_grad()
def test_dynamic_img_size_resamples_the_patch_position_table() -> None:
    m = cait(dynamic_img_size=True)
    assert m.forward_features(torch.randn(1, 3, 48, 64)).shape == (1, 1 + 3 * 4, 32)
    with pytest.raises(ValueError, match="input size"):
        cait()(torch.randn(1, 3, 48, 64))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="global_pool"):
        cait(global_pool="map")
    with pytest.raises(ValueError, match="class_attn_depth"):
        cait(class_attn_depth=0)
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("cait_xxs24_224", img_size=100)
    with pytest.raises(ValueError, match="global_pool"):
        cait().reset_classifier(3, global_pool="map")
    with pytest.raises(ValueError, match="num_heads"):
        cait(num_heads=5)
