"""DeiT: configurations, the distillation token and heads, parity with timm."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm
from medvit.models.image.deit import VisionTransformerDistilled
from medvit.models.image.vit import VisionTransformer

from helpers import require


NAMES = medvit.list_models("deit_*")
SMALL = dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def distilled(**kw) -> VisionTransformerDistilled:
    return medvit.create_model("deit_small_distilled_patch16_224", **{**SMALL, **kw}).eval()


def perturbed(name: str, **kw) -> torch.nn.Module:
    timm = require("timm")
    ref = timm.create_model(name, **kw).eval()
    with torch.no_grad():  # timm zero-initialises some tensors; make every one count
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def test_registered_names_and_classes() -> None:
    assert NAMES == sorted(
        f"deit_{s}{d}_patch16_224" for s in ("base", "small", "tiny") for d in ("", "_distilled")
    )
    with torch.device("meta"):
        assert type(medvit.create_model("deit_tiny_patch16_224")) is VisionTransformer
        assert isinstance(medvit.create_model("deit_tiny_distilled_patch16_224"), VisionTransformerDistilled)


def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    for name in NAMES:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


@torch.no_grad()
@pytest.mark.parametrize(
    "name, extra",
    [
        ("deit_small_patch16_224", dict(no_embed_class=True, init_values=0.1)),
        ("deit_small_distilled_patch16_224", {}),
        # timm's distilled model breaks with no_embed_class (its table keeps the prefix rows)
        ("deit_small_distilled_patch16_224", dict(init_values=0.1, qkv_bias=False)),
    ],
)
def test_timm_parity_small(name: str, extra: dict) -> None:
    kw = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=7, **extra)
    ref = perturbed(name, **kw)
    ours = load_timm(medvit.create_model(name, **kw), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_distilled_dynamic_img_size() -> None:
    kw = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=7, dynamic_img_size=True)
    ref = perturbed("deit_small_distilled_patch16_224", **kw)
    ours = load_timm(medvit.create_model("deit_small_distilled_patch16_224", **kw), ref.state_dict()).eval()
    x = torch.randn(2, 3, 48, 80)  # another grid: the table is resampled, prefix rows kept
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_timm_parity_full_size_tiny_distilled() -> None:
    ref = perturbed("deit_tiny_distilled_patch16_224")
    ours = load_timm(medvit.create_model("deit_tiny_distilled_patch16_224"), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_distilled_training_returns_both_heads_as_timm() -> None:
    kw = dict(img_size=32, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    ref = perturbed("deit_tiny_distilled_patch16_224", **kw)
    ours = load_timm(medvit.create_model("deit_tiny_distilled_patch16_224", **kw), ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    ours.train()
    assert ours(x).shape == (2, 4)  # not yet in distilled training: the heads are averaged
    ours.set_distilled_training()
    ref.set_distilled_training()
    ref.train()
    cls_logits, dist_logits = ours(x)
    ref_cls, ref_dist = ref(x)
    torch.testing.assert_close(cls_logits, ref_cls, atol=1e-4, rtol=0)
    torch.testing.assert_close(dist_logits, ref_dist, atol=1e-4, rtol=0)
    assert not torch.allclose(cls_logits, dist_logits)
    # at inference the two heads are averaged, whatever the flag
    ours.eval()
    torch.testing.assert_close(ours(x), (cls_logits + dist_logits) / 2)


@torch.no_grad()
def test_heads_read_class_and_distillation_tokens() -> None:
    m = distilled()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 2 + 4, 32) and m.num_prefix_tokens == 2
    assert m.pos_embed.shape == (1, 2 + 4, 32)
    expected = (m.head(feats[:, 0]) + m.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, :2].mean(1))


@torch.no_grad()
def test_num_classes_zero_and_reset_classifier() -> None:
    x = torch.randn(2, 3, 32, 32)
    m = distilled(num_classes=0)
    assert m(x).shape == (2, m.num_features) == (2, 32)
    torch.testing.assert_close(m(x), m.forward_features(x)[:, :2].mean(1))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.head.out_features == m.head_dist.out_features == 3
    assert m.num_classes == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)
    with pytest.raises(ValueError, match="global_pool must be 'token'"):
        m.reset_classifier(3, global_pool="avg")


@torch.no_grad()
def test_forward_intermediates_drop_both_prefix_tokens() -> None:
    m = distilled()
    x = torch.randn(2, 3, 32, 32)
    final, feats = m.forward_intermediates(x)
    assert [f.shape for f in feats] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    pairs = m.forward_intermediates(x, [-1], norm=True, output_fmt="NLC", intermediates_only=True,
                                    return_prefix_tokens=True)
    tokens, prefix = pairs[0]
    assert tokens.shape == (2, 4, 32) and prefix.shape == (2, 2, 32)
    torch.testing.assert_close(torch.cat([prefix, tokens], 1), final)


def test_freeze_patch_embed_and_sincos() -> None:
    m = distilled(freeze_patch_embed=True, pos_embed="sincos").train()
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    assert m.pos_embed.shape == (1, 2 + 4, 32) and not m.pos_embed[:, :2].any()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert m.dist_token.grad is not None and m.patch_embed.proj.weight.grad is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="global_pool must be 'token'"):
        distilled(global_pool="avg")
    with pytest.raises(ValueError, match="class_token"):
        distilled(class_token=False)
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("deit_tiny_distilled_patch16_224", img_size=100)
    with pytest.raises(ValueError, match="input size"):
        distilled()(torch.randn(1, 3, 48, 48))
