"""BoTNet: attention-layer parity with timm's BottleneckAttn, the paper's configuration, interface."""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers.rel_pos_attention import RelPosSelfAttention2d
from tiny_configs import tiny_overrides

from helpers import require


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


@pytest.mark.parametrize("stride", [1, 2])
def test_mhsa_matches_timm_bottleneck_attn(stride: int) -> None:
    timm_attn = require("timm.layers.bottleneck_attn")
    torch.manual_seed(0)
    ref = _perturbed(timm_attn.BottleneckAttn(32, 48, feat_size=(6, 4), stride=stride, num_heads=4))
    ours = RelPosSelfAttention2d(32, 48, feat_size=(6, 4), stride=stride, num_heads=4).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 32, 6, 4)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, ref(x), atol=1e-4, rtol=0)
    assert out.shape == (2, 48, 6 // stride, 4 // stride)


def test_bot_block_attention_inside_model_matches_timm() -> None:
    timm_attn = require("timm.layers.bottleneck_attn")
    torch.manual_seed(0)
    model = medvit.create_model("botnet50", **tiny_overrides("botnet50")).eval()
    first_bot = model.stages[3][0].conv2  # 4x4 map at 64 px, strided
    ref = _perturbed(timm_attn.BottleneckAttn(32, 32, feat_size=(4, 4), stride=2, num_heads=4))
    first_bot.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(first_bot(x), ref(x), atol=1e-4, rtol=0)


def test_paper_configurations() -> None:
    with torch.device("meta"):
        bot50 = medvit.create_model("botnet50")
        s1 = medvit.create_model("botnet_s1_59")
    # paper: BoT50 has 20.8M parameters (ResNet-50: 25.5M)
    assert abs(sum(p.numel() for p in bot50.parameters()) - 20.8e6) < 0.1e6
    assert [len(s) for s in bot50.stages] == [3, 4, 6, 3]
    assert all(isinstance(b.conv2, RelPosSelfAttention2d) for b in bot50.stages[3])
    assert not any(isinstance(b.conv2, RelPosSelfAttention2d) for s in bot50.stages[:3] for b in s)
    assert bot50.stages[3][0].conv2.feat_size == (14, 14) and bot50.stages[3][1].conv2.feat_size == (7, 7)
    assert bot50.stages[3][0].conv2.num_heads == 4
    assert bot50.stage_strides == [4, 8, 16, 32] and s1.stage_strides == [4, 8, 16, 16]
    assert [len(s) for s in s1.stages] == [3, 4, 6, 6]


def test_full_size_botnet50_runs() -> None:
    model = medvit.create_model("botnet50", num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_forward_intermediates() -> None:
    model = medvit.create_model("botnet50", **tiny_overrides("botnet50")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [f.shape[1] for f in feats] == model.stage_channels == [32, 64, 64, 128]
        assert [64 // f.shape[-1] for f in feats] == model.stage_strides == [4, 8, 16, 32]
        torch.testing.assert_close(final, model.forward_features(x))
        nlc = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
        assert nlc[0].shape == (2, 8 * 8, 64)
        early = model.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
        assert [f.shape[1] for f in early] == [64, 128]

    s1 = medvit.create_model("botnet_s1_59", **tiny_overrides("botnet_s1_59")).eval()
    with torch.no_grad():
        feats = s1.forward_intermediates(x, intermediates_only=True)
    assert [64 // f.shape[-1] for f in feats] == s1.stage_strides == [4, 8, 16, 16]


def test_classifier_reset_and_pooled_features() -> None:
    cfg = tiny_overrides("botnet50")
    model = medvit.create_model("botnet50", **{**cfg, "num_classes": 0}).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, model.num_features) == (2, 128)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0, global_pool="")
    fmap = model(x)
    assert fmap.shape == (2, 128, 2, 2)
    # the pooled features are the spatial mean of that map
    model.reset_classifier(0, global_pool="avg")
    torch.testing.assert_close(model(x), fmap.mean((2, 3)))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("botnet50", img_size=200)
    with pytest.raises(ValueError, match="num_heads"):
        medvit.create_model("botnet50", **{**tiny_overrides("botnet50"), "num_heads": 3})
    model = medvit.create_model("botnet50", **tiny_overrides("botnet50"))
    with pytest.raises(ValueError, match="built for"):
        model(torch.randn(1, 3, 96, 96))


def test_freeze_patch_embed() -> None:
    model = medvit.create_model("botnet50", **tiny_overrides("botnet50"), freeze_patch_embed=True)
    assert not model.conv1.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "conv1.weight")
