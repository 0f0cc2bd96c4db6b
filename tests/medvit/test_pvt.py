"""PVT v1: paper configurations, SRA against timm's, the class token, the backbone interface."""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers.sra import SpatialReductionAttention

from helpers import require

SMALL = dict(img_size=64, depth=(1, 2, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4))


def test_parameter_counts_match_the_paper() -> None:
    assert medvit.list_models("pvt_[!v]*") == [
        "pvt_large", "pvt_medium", "pvt_small", "pvt_tiny", "pvt_tiny_3d"
    ]
    paper = {"pvt_tiny": 13.2, "pvt_small": 24.5, "pvt_medium": 44.2, "pvt_large": 61.4}
    for name, millions in paper.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in medvit.create_model(name).parameters())
        assert abs(n / 1e6 - millions) < 0.05, (name, n)


@pytest.mark.parametrize("sr_ratio", [1, 4])
def test_sra_matches_timm_attention(sr_ratio: int) -> None:
    timm_pvt = require("timm.models.pvt_v2")
    ref = timm_pvt.Attention(32, num_heads=4, sr_ratio=sr_ratio).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = SpatialReductionAttention(2, 32, num_heads=4, grid_size=(8, 12), sr_ratio=sr_ratio).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 96, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x, [8, 12]), atol=1e-5, rtol=0)


def test_sra_keeps_the_class_token_unreduced() -> None:
    sra = SpatialReductionAttention(2, 16, 2, grid_size=(4, 4), sr_ratio=2, num_prefix_tokens=1).eval()
    x = torch.randn(1, 17, 16)
    assert sra._reduce(x).shape == (1, 1 + 4, 16)
    torch.testing.assert_close(sra._reduce(x)[:, :1], x[:, :1])


def test_classifier_reads_the_class_token() -> None:
    model = medvit.create_model("pvt_tiny", num_classes=0, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 1 + 2 * 2, 64)
    torch.testing.assert_close(model(x), tokens[:, 0])
    assert model.stages[3].cls_token is not None and model.stages[0].cls_token is None
    assert model.stages[3].pos_embed.shape == (1, 5, 64)


def test_forward_intermediates_shapes() -> None:
    model = medvit.create_model("pvt_small", **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    final, feats = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(model.stage_channels, model.stage_strides)
    ]
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(feats[-1].flatten(2).transpose(1, 2), final[:, 1:])
    nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
    assert nlc[0].shape == (2, 256, 16)
    early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], feats[1])


def test_3d_variant_multiscale_features() -> None:
    model = medvit.create_model("pvt_tiny_3d", **{**SMALL, "img_size": (32, 32, 64)}).eval()
    feats = model.forward_intermediates(torch.randn(1, 1, 32, 32, 64), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (16, 8, 8, 16), (32, 4, 4, 8), (48, 2, 2, 4), (64, 1, 1, 2)
    ]


def test_reset_classifier_pooling_and_frozen_patch_embed() -> None:
    model = medvit.create_model("pvt_tiny", num_classes=3, freeze_patch_embed=True, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 3)
    assert not any(p.requires_grad for p in model.stages[0].patch_embed.parameters())
    assert model.stages[1].patch_embed.proj.weight.requires_grad
    model.reset_classifier(7, global_pool="avg")
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), model.forward_features(x)[:, 1:].mean(1))
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(2, global_pool="max")


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("pvt_tiny", img_size=100)
    with pytest.raises(ValueError, match="one entry per stage"):
        medvit.create_model("pvt_tiny", num_heads=(1, 2))
    with pytest.raises(ValueError, match="does not match"):
        medvit.create_model("pvt_tiny", **SMALL)(torch.randn(1, 3, 96, 96))
