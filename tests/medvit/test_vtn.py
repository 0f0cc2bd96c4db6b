"""VTN: backbones from the registry, Longformer-style temporal attention, interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from tiny_configs import tiny_overrides

import medvit
from medvit.convert import load_timm
from medvit.layers.attention import Attention
from medvit.layers.longformer_1d import LongformerAttention1d, longformer_mask_1d

_VIT = dict(backbone="vit_base_patch16_224",
            backbone_args=dict(embed_dim=32, depth=1, num_heads=2, img_size=32))
_CONVMIXER = dict(backbone="convmixer_768_32", backbone_args=dict(embed_dim=24, depth=1, img_size=28))


def _tiny(**kw: object) -> torch.nn.Module:
    return medvit.create_model("vtn_vit_base", **{**tiny_overrides("vtn_vit_base"), **kw})


def test_mask_is_local_plus_global() -> None:
    mask = longformer_mask_1d(6, 1, 1, torch.device("cpu"))
    assert mask[0].all() and mask[:, 0].all()
    assert mask[3].tolist() == [True, False, True, True, True, False]


def test_longformer_attention_matches_masked_reference_and_full_attention() -> None:
    torch.manual_seed(0)
    attn = LongformerAttention1d(16, num_heads=2, window_size=1, num_global=1, qkv_bias=True).eval()
    x = torch.randn(2, 7, 16)
    fused = attn(x)
    explicit, weights = attn(x, return_attn=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=0)
    mask = longformer_mask_1d(7, 1, 1, x.device)
    assert (weights[..., ~mask] == 0).all()
    # a window covering the clip is plain full attention
    full = Attention(16, num_heads=2, qkv_bias=True).eval()
    wide = LongformerAttention1d(16, num_heads=2, window_size=10, qkv_bias=True).eval()
    wide.load_state_dict(full.state_dict())
    torch.testing.assert_close(wide(x), full(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backbone", [_VIT, _CONVMIXER], ids=["vit", "convmixer"])
def test_backbones_from_registry(backbone: dict) -> None:
    model = _tiny(**backbone).eval()
    size = backbone["backbone_args"]["img_size"]
    x = torch.randn(2, 3, 4, size, size)
    assert model.img_size == (size, size)
    # a projection exists only where the backbone's width (24 for ConvMixer) is not 32
    assert (model.proj is not None) == (backbone is _CONVMIXER)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with torch.no_grad():
        frames = model.frame_features(x)
        ref = model.backbone(x[:, :, 2])
    torch.testing.assert_close(frames[:, 2], ref, atol=1e-5, rtol=0)


def test_frame_features_match_timm_backbone(timm: ModuleType) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("vit_base_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2,
                            num_classes=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = _tiny(**_VIT).eval()
    load_timm(model.backbone, ref.state_dict())
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        expected = ref(x.transpose(1, 2).reshape(8, 3, 32, 32)).reshape(2, 4, 32)
        torch.testing.assert_close(model.frame_features(x), expected, atol=1e-4, rtol=0)


def test_paper_configuration() -> None:
    with torch.device("meta"):
        model = medvit.create_model("vtn_vit_base")
    assert len(model.blocks) == 3 and model.embed_dim == 768 and model.proj is None
    assert model.backbone.num_features == 768 and model.num_frames == 16


def test_forward_intermediates_and_interface() -> None:
    model = _tiny().eval()
    x = torch.randn(2, 3, 4, 32, 32)
    final, feats = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 1, 1)]
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    assert tuple(nlc[0].shape) == (2, 4, 32)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    frozen = _tiny(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.backbone.patch_embed.parameters())
    gray = _tiny(img_size=48, in_chans=1)
    assert (gray.in_chans, gray.img_size) == (1, (48, 48))
    assert gray(torch.randn(1, 1, 4, 48, 48)).shape == (1, 10)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model name"):
        _tiny(backbone="no_such_backbone")
    with pytest.raises(ValueError, match="2D image backbone"):
        _tiny(backbone="vit_base_patch16_96_3d")
    with pytest.raises(ValueError, match="expected input"):
        _tiny()(torch.randn(1, 3, 5, 32, 32))
