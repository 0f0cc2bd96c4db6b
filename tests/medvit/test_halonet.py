"""HaloNet: attention-layer parity with timm's HaloAttn, the paper's configurations, interface."""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers.halo_attention import HaloAttention
from tiny_configs import tiny_overrides

from helpers import require


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


@pytest.mark.parametrize(("stride", "block", "halo"), [(1, 4, 1), (2, 4, 1), (1, 8, 3), (2, 8, 3)])
def test_halo_attention_matches_timm(stride: int, block: int, halo: int) -> None:
    timm_attn = require("timm.layers.halo_attn")
    torch.manual_seed(0)
    ref = _perturbed(timm_attn.HaloAttn(32, 48, stride=stride, num_heads=4, block_size=block, halo_size=halo))
    ours = HaloAttention(32, 48, stride=stride, num_heads=4, block_size=block, halo_size=halo).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 32, 2 * block, 3 * block)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out, ref(x), atol=1e-4, rtol=0)
    assert out.shape == (2, 48, 2 * block // stride, 3 * block // stride)


def test_paper_configurations() -> None:
    # paper Table 2: H0 5.5M, H1 8.1M, H2 9.4M parameters
    expected = {"halonet_h0": 5.5e6, "halonet_h1": 8.1e6, "halonet_h2": 9.4e6}
    for name, count in expected.items():
        with torch.device("meta"):
            model = medvit.create_model(name)
        assert abs(sum(p.numel() for p in model.parameters()) - count) < 0.05e6, name
        assert model.img_size == (256, 256) and model.stage_strides == [4, 8, 16, 32]
        attn = model.stages[2][0].conv2
        assert isinstance(attn, HaloAttention)
        assert (attn.block_size, attn.halo_size, attn.num_heads) == (8, 3, 8)
    with torch.device("meta"):
        h1 = medvit.create_model("halonet_h1")
    assert [len(s) for s in h1.stages] == [3, 3, 10, 3]


def test_full_size_halonet_h0_runs() -> None:
    model = medvit.create_model("halonet_h0", num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 5) and torch.isfinite(out).all()


def test_forward_intermediates() -> None:
    model = medvit.create_model("halonet_h1", **tiny_overrides("halonet_h1")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x)
        assert [f.shape[1] for f in feats] == model.stage_channels == [16, 16, 32, 32]
        assert [64 // f.shape[-1] for f in feats] == model.stage_strides == [4, 8, 16, 32]
        torch.testing.assert_close(final, model.forward_features(x))
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
        assert nlc[0].shape == (2, 16 * 16, 16)
        with pytest.raises(ValueError, match="output_fmt"):
            model.forward_intermediates(x, output_fmt="NHWC")


def test_classifier_reset_pooled_features_and_freeze() -> None:
    cfg = {**tiny_overrides("halonet_h2"), "num_classes": 0}
    model = medvit.create_model("halonet_h2", **cfg, freeze_patch_embed=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, model.num_features) == (2, 40)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("halonet_h1", img_size=224)
    with pytest.raises(ValueError, match="block_size"):
        HaloAttention(16, block_size=4, stride=3)
    model = medvit.create_model("halonet_h0", **tiny_overrides("halonet_h0"))
    with pytest.raises(ValueError, match="must divide"):
        model(torch.randn(1, 3, 72, 72))
