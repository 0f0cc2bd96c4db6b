"""MViTv2: timm parity with the same weights, parameter counts, the common interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm

from helpers import require


def _perturbed(ref: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in ref.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)
    return ref.eval()


@torch.no_grad()
@pytest.mark.parametrize("depths,embed_dim,heads,img", [((1, 1, 1, 1), 16, 1, 64), ((1, 2, 2, 1), 16, 2, 64)])
def test_timm_parity_small(depths, embed_dim, heads, img) -> None:
    MultiScaleVit = require("timm.models.mvitv2").MultiScaleVit
    MultiScaleVitCfg = require("timm.models.mvitv2").MultiScaleVitCfg
    ref = _perturbed(MultiScaleVit(MultiScaleVitCfg(depths=depths, embed_dim=embed_dim, num_heads=heads),
                                   img_size=img, num_classes=5))
    ours = medvit.create_model("mvitv2_tiny", depth=depths, embed_dim=embed_dim, num_heads=heads,
                               img_size=img, num_classes=5)
    load_timm(ours, ref.state_dict()).eval()
    x = torch.randn(2, 3, img, img)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_mvitv2_tiny_full_size(timm: ModuleType) -> None:
    # full width and depth; a 64-pixel input keeps the shared CPU time low
    torch.manual_seed(0)
    ref = _perturbed(timm.create_model("mvitv2_tiny", img_size=64))
    ours = load_timm(medvit.create_model("mvitv2_tiny", img_size=64), ref.state_dict()).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    names = [n for n in medvit.list_models("mvitv2*") if n in timm.list_models()]
    assert {"mvitv2_tiny", "mvitv2_small", "mvitv2_base"} <= set(names)
    for name in names:
        with torch.device("meta"):
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name
    # the paper's Table: T 24M, S 35M, B 52M
    with torch.device("meta"):
        assert round(sum(p.numel() for p in medvit.create_model("mvitv2_tiny").parameters()) / 1e6) == 24


def _tiny(**kw):
    return medvit.create_model("mvitv2_tiny", embed_dim=16, depth=(1, 1, 2, 1), img_size=64, **kw)


@torch.no_grad()
def test_forward_intermediates_stage_maps() -> None:
    m = _tiny(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    final, feats = m.forward_intermediates(x)
    assert m.stage_channels == [16, 32, 64, 128] and m.stage_strides == [4, 8, 16, 32]
    assert [f.shape for f in feats] == [(2, c, 64 // s, 64 // s) for c, s in zip(m.stage_channels, m.stage_strides)]
    torch.testing.assert_close(final, m.forward_features(x))
    nlc = m.forward_intermediates(x, indices=[-1], output_fmt="NLC", norm=True, intermediates_only=True)
    torch.testing.assert_close(nlc[0], final)
    early = m.forward_intermediates(x, indices=[1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], feats[1])
    with pytest.raises(ValueError):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_heads_and_freeze() -> None:
    m = _tiny(num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 4)
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.num_classes == 7
    m.reset_classifier(0, global_pool="")
    assert m(x).shape == (2, 4, 128)
    assert _tiny(num_classes=0)(x).shape == (2, 128) and m.num_features == 128
    frozen = _tiny(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())
    assert all(p.requires_grad for p in frozen.stages.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("mvitv2_tiny", img_size=100)
    with pytest.raises(ValueError, match="global_pool"):
        medvit.create_model("mvitv2_tiny", global_pool="token")
    with pytest.raises(ValueError, match="differs from img_size"):
        _tiny()(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="class token"):
        load_timm(_tiny(), {"cls_token": torch.zeros(1, 1, 16)})
