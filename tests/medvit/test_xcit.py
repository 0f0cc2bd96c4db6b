"""XCiT: cross-covariance attention, the conv stem, configurations and parity with timm."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm
from medvit.layers.attention_variants import XCA

from helpers import require


NAMES = medvit.list_models("xcit_*")
SMALL = dict(img_size=32, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def xcit(**kw):
    return medvit.create_model("xcit_tiny_12_p16_224", **{**SMALL, **kw}).eval()


def perturbed(name: str, **kw) -> torch.nn.Module:
    timm = require("timm")
    ref = timm.create_model(name, **kw).eval()
    with torch.no_grad():  # zero biases, unit temperatures and BN statistics must count too
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return ref


def test_registered_names_and_parameter_counts_match_timm(timm: ModuleType) -> None:
    assert NAMES == ["xcit_small_12_p16_224", "xcit_tiny_12_p16_224"]
    for name in NAMES:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


@torch.no_grad()
def test_xca_weights_path_matches_fused_path() -> None:
    attn = XCA(32, num_heads=4, qkv_bias=True).eval()
    with torch.no_grad():
        attn.temperature.uniform_(0.5, 2.0)
    x = torch.randn(2, 10, 32)
    y, weights = attn(x, return_attn=True)
    assert weights.shape == (2, 4, 8, 8)  # channels x channels per head, whatever the tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 8))
    torch.testing.assert_close(y, attn(x), atol=1e-5, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize(
    "extra",
    [
        {},  # the registered p16 configuration: tokens_norm=True
        dict(tokens_norm=False, global_pool="avg", qkv_bias=False, eta=0.1),
        dict(patch_size=8, use_pos_embed=False),
    ],
)
def test_timm_parity_small(extra: dict) -> None:
    kw = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=7, **extra)
    ref = perturbed("xcit_tiny_12_p16_224", **kw)
    if "eta" in kw:
        kw["init_values"] = kw.pop("eta")
    ours = load_timm(medvit.create_model("xcit_tiny_12_p16_224", **kw), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    feats = ours.forward_intermediates(x, intermediates_only=True)
    ref_feats = ref.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_at_another_input_size() -> None:
    kw = dict(img_size=64, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    ref = perturbed("xcit_tiny_12_p16_224", **kw)
    ours = load_timm(medvit.create_model("xcit_tiny_12_p16_224", **kw), ref.state_dict()).eval()
    x = torch.randn(1, 3, 48, 80)  # the Fourier encoding and LPI follow the grid
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_timm_parity_full_size_tiny() -> None:
    ref = perturbed("xcit_tiny_12_p16_224")
    ours = load_timm(medvit.create_model("xcit_tiny_12_p16_224"), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_interface_shapes() -> None:
    m = xcit()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 4, 32) and m.img_size == (32, 32) and m.spatial_dims == 2
    torch.testing.assert_close(m(x), m.head(feats[:, 0]))
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])
    final, inter = m.forward_intermediates(x, indices=[0, 2])
    assert [f.shape for f in inter] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(final, feats)
    nlc = m.forward_intermediates(x, 2, norm=True, output_fmt="NLC", intermediates_only=True)
    assert [f.shape for f in nlc] == [(2, 4, 32)] * 2
    early = m.forward_intermediates(x, [1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], m.forward_intermediates(x, [1], intermediates_only=True)[0])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, [3])
    # any input size the patch divides: the token grid follows it
    assert m.forward_intermediates(torch.randn(1, 3, 48, 64), [0], intermediates_only=True)[0].shape == (
        1, 32, 3, 4,
    )


def test_num_classes_zero_reset_and_freeze() -> None:
    m = xcit(num_classes=0, freeze_patch_embed=True, drop_path_rate=0.1)
    assert {b.drop_path1.drop_prob for b in m.blocks} == {0.1}
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, m.num_features) == (2, 32)
    m.reset_classifier(4, global_pool="avg")
    assert m(x).shape == (2, 4) and m.num_classes == 4
    m.reset_classifier(0, global_pool="")
    assert m(x).shape == (2, 5, 32)
    m.reset_classifier(3, global_pool="token")
    m.train()
    m(x).sum().backward()
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    assert m.patch_embed.proj[0][0].weight.grad is None and m.cls_token.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="patch_size 8 or 16"):
        xcit(patch_size=12)
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("xcit_tiny_12_p16_224", img_size=100)
    with pytest.raises(ValueError, match="does not divide"):
        xcit()(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="global_pool"):
        xcit(global_pool="map")
    with pytest.raises(ValueError, match="global_pool"):
        xcit().reset_classifier(2, global_pool="map")
    with pytest.raises(ValueError, match="num_heads"):
        xcit(num_heads=3)
    with pytest.raises(ValueError, match="class_attn_depth"):
        xcit(class_attn_depth=0)
    with pytest.raises(ValueError, match="qk_norm"):
        XCA(32, 4, qk_norm=True)
