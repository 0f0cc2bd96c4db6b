"""PiT: configurations, per-stage features and parity with timm."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm


NAMES = medvit.list_models("pit_*")
SMALL = dict(img_size=64, patch_size=8, stride=4, embed_dim=(32, 64, 128), depth=(1, 2, 1), num_heads=(2, 4, 8))
TIMM_SMALL = dict(img_size=64, patch_size=8, stride=4, base_dims=(16, 16, 16), depth=(1, 2, 1), heads=(2, 4, 8))


def perturb(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # zero-initialised biases must count too
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def test_registered_names_and_parameter_counts_match_timm(timm: ModuleType) -> None:
    assert NAMES == ["pit_b_224", "pit_s_224", "pit_ti_224", "pit_xs_224"]
    for name in NAMES:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


@torch.no_grad()
@pytest.mark.parametrize("distilled", [False, True])
def test_timm_parity_small(distilled: bool, timm: ModuleType) -> None:
    ref = perturb(timm.create_model("pit_ti_224", num_classes=7, distilled=distilled, **TIMM_SMALL))
    ours = medvit.create_model("pit_ti_224", num_classes=7, distilled=distilled, **SMALL)
    load_timm(ours, ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    final, feats = ours.forward_intermediates(x)
    ref_final, ref_feats = ref.forward_intermediates(x)
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_full_size_pit_ti(timm: ModuleType) -> None:
    ref = perturb(timm.create_model("pit_ti_224"))
    ours = load_timm(medvit.create_model("pit_ti_224"), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_forward_intermediates_are_per_stage_maps() -> None:
    model = medvit.create_model("pit_ti_224", **SMALL).eval()
    assert model.stage_channels == [32, 64, 128] and model.stage_strides == [4, 8, 16]
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_intermediates(x, intermediates_only=True)
    # stem: (64 - 8) // 4 + 1 = 15 tokens a side, then halved (rounding up) twice
    assert [tuple(f.shape) for f in feats] == [(2, 32, 15, 15), (2, 64, 8, 8), (2, 128, 4, 4)]
    nlc = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True, stop_early=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, 16, 128)
    torch.testing.assert_close(nlc[0], feats[-1].flatten(2).transpose(1, 2))
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


@torch.no_grad()
def test_reset_classifier_and_pooled_features() -> None:
    model = medvit.create_model("pit_ti_224", num_classes=5, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 5)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pooled)
    assert model.num_features == 128
    feats_only = medvit.create_model("pit_ti_224", num_classes=0, **SMALL).eval()
    assert feats_only(x).shape == (2, 128)


def test_freeze_patch_embed() -> None:
    model = medvit.create_model("pit_ti_224", freeze_patch_embed=True, **SMALL)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert model.pos_embed.requires_grad and model.cls_token.requires_grad


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="smaller than the patch size"):
        medvit.create_model("pit_ti_224", img_size=8)
    with pytest.raises(ValueError, match="one entry per stage"):
        medvit.create_model("pit_ti_224", depth=(2, 6))
    with pytest.raises(ValueError, match="global_pool"):
        medvit.create_model("pit_ti_224", global_pool="avg")
    model = medvit.create_model("pit_ti_224", **SMALL)
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        model(torch.randn(1, 3, 32, 32))
