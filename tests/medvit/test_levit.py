"""LeViT: configurations, attention bias, per-stage features and parity with timm."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm
from medvit.layers.attention_bias import AttentionBias, AttentionSubsample


NAMES = medvit.list_models("levit_*")
SMALL = dict(img_size=64, embed_dim=(32, 48, 64), key_dim=8, depth=(1, 2, 1), num_heads=(2, 3, 4))


def perturb(module: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Random parameters everywhere (zero-initialised BN scales too) and real BN statistics."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        module.train()(x)
    return module.eval()


def test_registered_names_and_parameter_counts_match_timm(timm: ModuleType) -> None:
    assert NAMES == ["levit_128", "levit_128s", "levit_192", "levit_256", "levit_384"]
    for name in NAMES:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


@torch.no_grad()
@pytest.mark.parametrize("distilled", [True, False])
def test_timm_parity_small(distilled: bool, timm: ModuleType) -> None:
    x = torch.randn(4, 3, 64, 64)
    ref = perturb(timm.create_model("levit_128s", num_classes=7, distilled=distilled, **SMALL), x)
    ours = medvit.create_model("levit_128s", num_classes=7, distilled=distilled, **SMALL)
    load_timm(ours, ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    final, feats = ours.forward_intermediates(x)
    ref_final, ref_feats = ref.forward_intermediates(x)
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    assert len(feats) == len(ref_feats) == 3
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_full_size_levit_128s(timm: ModuleType) -> None:
    ref = perturb(timm.create_model("levit_128s"), torch.randn(2, 3, 224, 224))
    ours = load_timm(medvit.create_model("levit_128s"), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_load_timm_rejects_conv_mode_weights(timm: ModuleType) -> None:
    kw = dict(SMALL, num_classes=7)
    ref = timm.create_model("levit_conv_128s", **kw)
    with pytest.raises(ValueError, match="conv-mode"):
        load_timm(medvit.create_model("levit_128s", **kw), ref.state_dict())


def test_attention_bias_depends_only_on_the_offset() -> None:
    attn = AttentionBias(16, key_dim=4, num_heads=2, resolution=(3, 4))
    with torch.no_grad():
        attn.attention_biases.copy_(torch.randn_like(attn.attention_biases))
    bias = attn.bias()
    assert bias.shape == (2, 12, 12)
    # tokens (0,0)->(1,2) and (1,1)->(2,3) share the offset (1, 2); (1,2)->(0,0) is its mirror
    torch.testing.assert_close(bias[:, 0, 6], bias[:, 5, 11])
    torch.testing.assert_close(bias[:, 0, 6], bias[:, 6, 0])
    torch.testing.assert_close(bias[:, 0, 0], attn.attention_biases[:, 0])
    sub = AttentionSubsample(16, 24, key_dim=4, num_heads=4, resolution=(5, 5))
    assert sub(torch.randn(2, 25, 16)).shape == (2, 9, 24)
    assert sub.attention_bias_idxs.shape == (9, 25)


@torch.no_grad()
def test_forward_intermediates_are_per_stage_maps() -> None:
    model = medvit.create_model("levit_128s", **SMALL).eval()
    assert model.stage_channels == [32, 48, 64] and model.stage_strides == [16, 32, 64]
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 4), (2, 48, 2, 2), (2, 64, 1, 1)]
    nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True, stop_early=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, 16, 32)
    torch.testing.assert_close(nlc[0], feats[0].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@torch.no_grad()
def test_reset_classifier_pooled_features_and_distilled_training() -> None:
    model = medvit.create_model("levit_128s", num_classes=5, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 5)
    tokens = model.forward_features(x)
    pooled = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(pooled, tokens.mean(1))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.head_dist.linear.out_features == 3
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pooled)
    assert model.num_features == 64
    assert medvit.create_model("levit_128s", num_classes=0, **SMALL).eval()(x).shape == (2, 64)
    model = medvit.create_model("levit_128s", num_classes=5, **SMALL)
    model.distilled_training = True
    y, y_dist = model.train()(x)
    assert y.shape == y_dist.shape == (2, 5)


def test_freeze_patch_embed() -> None:
    model = medvit.create_model("levit_128s", freeze_patch_embed=True, **SMALL)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert all(p.requires_grad for p in model.stages.parameters())


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="does not divide the image size"):
        medvit.create_model("levit_128s", img_size=100)
    with pytest.raises(ValueError, match="one entry per stage"):
        medvit.create_model("levit_128s", depth=(2, 3))
    with pytest.raises(ValueError, match="global_pool"):
        medvit.create_model("levit_128s", global_pool="token")
    with pytest.raises(ValueError, match="multiples of key_dim"):
        medvit.create_model("levit_128s", key_dim=24)
    model = medvit.create_model("levit_128s", **SMALL)
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        model(torch.randn(1, 3, 32, 32))
