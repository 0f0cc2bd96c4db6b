"""Video MViT v1: parity with torchvision's mvit_v1_b, interface and parameter counts."""

from __future__ import annotations

import pytest
import torch
from helpers import require
from tiny_configs import tiny_overrides

import medvit
from medvit.convert import load_torchvision
from medvit.models.video.mvit_video import MViTVideo


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)


def test_parameter_count_matches_torchvision() -> None:
    tv_video = require("torchvision.models.video")
    with torch.device("meta"):
        ours = medvit.create_model("mvit_base_16x4", num_classes=400)
        ref = tv_video.mvit_v1_b(num_classes=400)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 36_610_672


def test_parity_with_torchvision_small_clip() -> None:
    tv_video = require("torchvision.models.video")
    torch.manual_seed(0)
    # torchvision's MViT-B 16x4 architecture on a smaller clip (4 x 64 x 64)
    ref = tv_video.mvit_v1_b(num_classes=7)
    ref.pos_encoding.spatial_pos = torch.nn.Parameter(torch.randn(16 * 16, 96) * 0.02)
    ref.pos_encoding.temporal_pos = torch.nn.Parameter(torch.randn(2, 96) * 0.02)
    ref.pos_encoding.temporal_size, ref.pos_encoding.spatial_size = 2, (16, 16)
    _perturb(ref)
    ref.eval()
    ours = medvit.create_model("mvit_base_16x4", num_classes=7, num_frames=4, img_size=64).eval()
    load_torchvision(ours, ref.state_dict())
    x = torch.randn(1, 3, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def _tiny(**kw: object) -> MViTVideo:
    return medvit.create_model("mvit_base_16x4", **{**tiny_overrides("mvit_base_16x4"), **kw})


def test_forward_intermediates_and_interface() -> None:
    model = _tiny().eval()
    x = torch.randn(2, 3, 4, 32, 32)
    final, feats = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 2, 8, 8), (2, 64, 2, 4, 4), (2, 128, 2, 2, 2),
                                                (2, 128, 2, 1, 1)]
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    assert tuple(nlc[0].shape) == (2, 32, 64)
    assert model.spatial_dims == 2 and model.img_size == (32, 32) and model.num_frames == 4
    assert model(x).shape == (2, 10)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    assert _tiny(num_classes=0)(x).shape == (2, 128)
    frozen = _tiny(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        _tiny(img_size=48)
    with pytest.raises(ValueError, match="clip size"):
        _tiny()(torch.randn(1, 3, 8, 32, 32))


def test_parity_with_torchvision_full_size() -> None:
    tv_video = require("torchvision.models.video")
    torch.manual_seed(0)
    ref = tv_video.mvit_v1_b()
    _perturb(ref)
    ref.eval()
    ours = medvit.create_model("mvit_base_16x4").eval()
    load_torchvision(ours, ref.state_dict())
    x = torch.randn(1, 3, 16, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
