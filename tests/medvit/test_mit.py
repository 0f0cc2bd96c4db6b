"""Mix Transformer (SegFormer encoder): configurations, parity, 2D and 3D multi-scale features."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm


SMALL = dict(img_size=64, depth=(1, 2, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4))


def _count(name: str, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in medvit.create_model(name, **kw).parameters())


def test_registered_names_and_encoder_parameter_counts() -> None:
    names = medvit.list_models("mit_*")
    assert names == [
        "mit_b0", "mit_b0_3d", "mit_b1", "mit_b1_3d", "mit_b2", "mit_b3", "mit_b4", "mit_b5"
    ]
    # SegFormer Table 1, encoder parameters in millions
    paper = {
        "mit_b0": 3.4, "mit_b1": 13.1, "mit_b2": 24.2,
        "mit_b3": 44.0, "mit_b4": 60.8, "mit_b5": 81.4,
    }
    for name, millions in paper.items():
        assert abs(_count(name, num_classes=0) / 1e6 - millions) < 0.1, name


def test_mit_is_pvt_v2_with_4x_mix_ffn() -> None:
    # MiT-B5 and PVT v2-b5 are the same network
    assert _count("mit_b5") == _count("pvt_v2_b5")
    with torch.device("meta"):
        mlp = medvit.create_model("mit_b1").stages[0].blocks[0].mlp
        assert mlp.fc1.out_features == 4 * 64
        assert medvit.create_model("mit_b1").stages[3].blocks[0].mlp.dwconv.groups == 4 * 512


def test_parity_with_timm_pvt_v2_as_mit(timm: ModuleType) -> None:
    ref = timm.create_model(
        "pvt_v2_b1", depths=SMALL["depth"], embed_dims=SMALL["embed_dim"],
        num_heads=SMALL["num_heads"], mlp_ratios=(4, 4, 4, 4), num_classes=6,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = medvit.create_model("mit_b1", num_classes=6, **SMALL).eval()
    load_timm(ours, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_3d_multiscale_features() -> None:
    model = medvit.create_model("mit_b0_3d", num_classes=0, **{**SMALL, "img_size": (32, 64, 32)})
    assert model.spatial_dims == 3 and model.img_size == (32, 64, 32)
    x = torch.randn(1, 1, 32, 64, 32)
    final, feats = model.forward_intermediates(x)
    assert model.stage_strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 32 // s, 64 // s, 32 // s) for c, s in zip(model.stage_channels, model.stage_strides)
    ]
    assert model(x).shape == (1, 64)
    assert final.shape == feats[-1].shape


def test_interface_and_bad_arguments() -> None:
    model = medvit.create_model("mit_b0", num_classes=5, freeze_patch_embed=True, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 5)
    assert not model.patch_embed.proj.weight.requires_grad
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    with pytest.raises(ValueError, match="no linear SRA"):
        medvit.create_model("mit_b0", linear=True)
    with pytest.raises(ValueError, match="smaller than the reduction ratio"):
        medvit.create_model("mit_b0_3d", img_size=(96, 96, 16))
