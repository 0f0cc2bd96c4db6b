"""ConvMixer: timm parity, paper configurations, per-block maps, the common interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm

from helpers import require


SMALL = dict(embed_dim=64, depth=3, num_classes=7, img_size=56)


def convmixer(name: str = "convmixer_1536_20", **kw):
    return medvit.create_model(name, **{**SMALL, **kw}).eval()


def _trained_reference(ref: torch.nn.Module, size: int) -> torch.nn.Module:
    """Perturb every parameter and give BatchNorm non-trivial running statistics."""
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        ref.train()(torch.randn(4, 3, size, size))
    return ref.eval()


def test_parameter_counts_match_timm_and_paper(timm: ModuleType) -> None:
    names = medvit.list_models("convmixer_*")
    assert names == ["convmixer_1024_20_ks9_p14", "convmixer_1536_20", "convmixer_768_32"]
    counts = {}
    for name in names:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            counts[name] = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert counts[name] == ref, name
    # the paper's ImageNet table: 1536/20 51.6M, 768/32 21.1M, 1024/20 (p14) 24.4M
    assert round(counts["convmixer_1536_20"] / 1e5) == 516
    assert round(counts["convmixer_768_32"] / 1e5) == 211
    assert round(counts["convmixer_1024_20_ks9_p14"] / 1e5) == 244


@torch.no_grad()
@pytest.mark.parametrize(
    "name,timm_kw",
    [
        ("convmixer_1536_20", dict(kernel_size=9, patch_size=7)),
        ("convmixer_768_32", dict(kernel_size=7, patch_size=7, act_layer=torch.nn.ReLU)),
        ("convmixer_1024_20_ks9_p14", dict(kernel_size=9, patch_size=14)),
    ],
)
def test_timm_parity_small(name, timm_kw) -> None:
    TimmConvMixer = require("timm.models.convmixer").ConvMixer
    ref = _trained_reference(TimmConvMixer(dim=64, depth=3, num_classes=7, **timm_kw), 56)
    ours = load_timm(convmixer(name), ref.state_dict()).eval()
    x = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    final, feats = ours.forward_intermediates(x)
    ref_final, ref_feats = ref.forward_intermediates(x)
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    # fully convolutional: the same at a size it was not built for (not square, not 56)
    other = torch.randn(1, 3, 70, 42)
    torch.testing.assert_close(ours(other), ref(other), atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_full_size_1024_20(timm: ModuleType) -> None:
    # the registered ConvMixer-1024/20 weights; the network is convolutional, so a
    # 112 x 112 input exercises every layer at a quarter of the cost
    ref = _trained_reference(timm.create_model("convmixer_1024_20_ks9_p14"), 56)
    ours = load_timm(medvit.create_model("convmixer_1024_20_ks9_p14"), ref.state_dict()).eval()
    x = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_forward_intermediates_are_per_block_maps() -> None:
    m = convmixer()
    x = torch.randn(2, 3, 56, 56)
    final, feats = m.forward_intermediates(x)
    assert [f.shape for f in feats] == [(2, 64, 8, 8)] * 3
    torch.testing.assert_close(final, m.forward_features(x))
    torch.testing.assert_close(feats[-1], final)
    last = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert len(last) == 1 and last[0].shape == (2, 64, 64)
    torch.testing.assert_close(last[0], final.flatten(2).transpose(1, 2))
    early = m.forward_intermediates(x, [0], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], feats[0])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, [3])
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_other_input_sizes_are_accepted() -> None:
    out = convmixer(num_classes=0, global_pool="")(torch.randn(1, 3, 70, 42))
    assert out.shape == (1, 64, 10, 6)


def test_head_pooling_and_reset_classifier() -> None:
    x = torch.randn(2, 3, 56, 56)
    m = convmixer()
    assert m(x).shape == (2, 7) and m.num_features == 64 and m.spatial_dims == 2
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.mean((2, 3)))
    pooled = convmixer(num_classes=0)
    assert pooled(x).shape == (2, 64)
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.num_classes == 3
    m.reset_classifier(0, global_pool="")
    assert m(x).shape == (2, 64, 8, 8)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(5, global_pool="max")


def test_freeze_patch_embed() -> None:
    m = convmixer(freeze_patch_embed=True).train()
    assert not any(p.requires_grad for p in m.stem.proj.parameters())
    m(torch.randn(2, 3, 56, 56)).square().mean().backward()
    assert m.stem.proj.weight.grad is None and m.blocks[0].conv_dw.weight.grad is not None


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        convmixer(img_size=60)
    with pytest.raises(ValueError, match="depth"):
        convmixer(depth=0)
    with pytest.raises(ValueError, match="global_pool"):
        convmixer(global_pool="token")
