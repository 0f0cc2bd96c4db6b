"""Hybrid ViT (ResNetV2 + ViT), its backbone and layers, and the ViT-g/14 MAP configuration."""

from __future__ import annotations

from functools import partial
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from helpers import require
from tiny_configs import tiny_overrides

import medvit
from medvit.convert import load_timm
from medvit.layers.hybrid_embed import HybridEmbed
from medvit.layers.std_conv import MaxPool2dSame, StdConv2d
from medvit.models.image.resnetv2 import ResNetV2

SMALL = dict(img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=7)


def _perturbed(ref: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # timm zero-initialises some tensors; make every one count
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref.eval()


def timm_backbone(depths=(1, 1, 1)) -> torch.nn.Module:
    """timm's ViT-hybrid ResNet (as `vit_base_r50_s16_224` builds it)."""
    TimmResNetV2 = require("timm.models.resnetv2").ResNetV2
    TimmStdConv2dSame = require("timm.layers").StdConv2dSame
    return TimmResNetV2(
        layers=depths, num_classes=0, global_pool="", preact=False, stem_type="same",
        conv_layer=partial(TimmStdConv2dSame, eps=1e-8),
    )


def timm_hybrid(depths=(1, 1, 1), **kw) -> torch.nn.Module:
    TimmHybridEmbed = require("timm.layers").HybridEmbed
    TimmViT = require("timm.models.vision_transformer").VisionTransformer
    embed = partial(TimmHybridEmbed, backbone=timm_backbone(depths))
    return TimmViT(patch_size=1, embed_layer=embed, **kw)


def hybrid(**kw):
    return medvit.create_model("vit_base_r50_s16_224", **{**SMALL, "backbone_depths": (1, 1, 1), **kw}).eval()


# -- layers ------------------------------------------------------------------------------
def test_std_conv_standardises_filters_and_pads_like_tensorflow() -> None:
    TimmStdConv2dSame = require("timm.layers").StdConv2dSame
    conv = StdConv2d(3, 8, 3, stride=2, padding="same", eps=1e-8)
    w = conv.weight
    var = w.var((1, 2, 3), unbiased=False, keepdim=True)
    std_w = (w - w.mean((1, 2, 3), keepdim=True)) / (var + 1e-8).sqrt()
    x = torch.randn(2, 3, 9, 10)
    y = conv(x)
    assert y.shape == (2, 8, 5, 5)  # ceil(size / stride)
    # TensorFlow puts the odd padding pixel at the end: 9 rows need 2 (1 + 1), 10 columns 1 (0 + 1)
    torch.testing.assert_close(y, F.conv2d(F.pad(x, (0, 1, 1, 1)), std_w, stride=2), atol=1e-5, rtol=0)
    ref = TimmStdConv2dSame(3, 8, 3, stride=2, eps=1e-8)
    ref.weight.data.copy_(w.data)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=0)
    static = StdConv2d(3, 8, 3, padding="same")  # stride 1: symmetric, fixed padding
    assert static.padding == (1, 1) and not static.dynamic_same
    with pytest.raises(ValueError, match="padding"):
        StdConv2d(3, 8, 3, padding="valid")


def test_max_pool_same_never_picks_the_padding() -> None:
    x = -torch.rand(1, 1, 5, 5) - 1.0  # all negative: a zero pad would win
    y = MaxPool2dSame(3, 2)(x)
    assert y.shape == (1, 1, 3, 3) and (y < -1.0).all()
    # TensorFlow's SAME: one pixel each side for 5 -> 3 at stride 2, padded with -inf
    ref = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=float("-inf")), 3, 2)
    torch.testing.assert_close(y, ref)


# -- the ResNet backbone (shared with TransUNet) ---------------------------------------------
@torch.no_grad()
def test_resnetv2_full_hybrid_backbone_matches_timm_features() -> None:
    ref = _perturbed(timm_backbone((3, 4, 9)))
    ours = ResNetV2(depths=(3, 4, 9), channels=(256, 512, 1024), num_classes=0, global_pool="")
    ours.load_state_dict(ref.state_dict())  # strict: timm's parameter names, unchanged
    ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.randn(1, 3, 50, 46)  # odd sizes: asymmetric "SAME" padding at every stride
    final, feats = ours.forward_intermediates(x)
    ref_final, ref_feats = ref.forward_intermediates(x)
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    assert [f.shape[1:] for f in feats] == [(64, 25, 23), (256, 13, 12), (512, 7, 6), (1024, 4, 3)]
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert ours.feature_channels == (64, 256, 512, 1024) and ours.feature_reductions == (2, 4, 8, 16)
    assert ours.reduction == 16 and ours.num_features == 1024


def test_resnetv2_interface_and_bad_arguments() -> None:
    m = ResNetV2(depths=(1, 1), channels=(128, 256), num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 5) and m.reduction == 8 and m.spatial_dims == 2
    feats = m.forward_features(x)
    assert feats.shape == (2, 256, 8, 8)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.mean((2, 3)))
    skips = m.forward_intermediates(x, indices=[0, 1], intermediates_only=True, stop_early=True)
    assert [s.shape for s in skips] == [(2, 64, 32, 32), (2, 128, 16, 16)]
    tokens = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert tokens[0].shape == (2, 64, 256)
    m.reset_classifier(0)
    assert m(x).shape == (2, 256)
    m.reset_classifier(0, global_pool="")
    assert m(x).shape == (2, 256, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, [3])
    with pytest.raises(ValueError, match="multiples of num_groups"):
        ResNetV2(depths=(1,), channels=(100,))
    with pytest.raises(ValueError, match="equal length"):
        ResNetV2(depths=(1, 1), channels=(256,))
    with pytest.raises(ValueError, match="global_pool"):
        ResNetV2(global_pool="map")


# -- the hybrid ViT ------------------------------------------------------------------------
def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    for name in ("vit_base_r50_s16_224", "vit_base_r50_s16_384"):
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            model = medvit.create_model(name, num_classes=1000)
        assert sum(p.numel() for p in model.parameters()) == ref, name
    bb = model.patch_embed.backbone
    assert [len(s.blocks) for s in bb.stages] == [3, 4, 9] and bb.reduction == 16
    assert model.patch_embed.proj.kernel_size == (1, 1) and model.patch_embed.proj.in_channels == 1024
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (768, 12, 12)
    assert model.grid_size == (24, 24) and model.patch_size == (16, 16)
    assert model.pos_embed.shape[1] == 1 + 24 * 24


@torch.no_grad()
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(global_pool="avg", class_token=False), dict(global_pool="map", class_token=False)],
)
def test_timm_parity_small(kwargs) -> None:
    ref = _perturbed(timm_hybrid(**SMALL, **kwargs))
    ours = load_timm(hybrid(**kwargs), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    final, feats = ours.forward_intermediates(x, indices=[1], norm=True)
    ref_final, ref_feats = ref.forward_intermediates(x, indices=[1], norm=True)
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    torch.testing.assert_close(feats[0], ref_feats[0], atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_checkpoint_at_another_resolution_is_resampled(timm: ModuleType) -> None:
    ref = _perturbed(timm_hybrid(**{**SMALL, "img_size": 32}))
    ours = load_timm(hybrid(img_size=96), ref.state_dict()).eval()
    sd = ref.state_dict()
    sd["pos_embed"] = timm.layers.resample_abs_pos_embed(sd["pos_embed"], (6, 6), num_prefix_tokens=1)
    ref_96 = timm_hybrid(**{**SMALL, "img_size": 96}).eval()
    ref_96.load_state_dict(sd)
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(ours(x), ref_96(x), atol=1e-4, rtol=0)


def test_forward_intermediates_and_backbone_skips() -> None:
    m = hybrid()
    x = torch.randn(2, 3, 64, 64)
    final, feats = m.forward_intermediates(x)
    assert [f.shape for f in feats] == [(2, 64, 4, 4)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    assert m.grid_size == (4, 4) and m.patch_size == (16, 16) and m.img_size == (64, 64)
    # TransUNet's path: one backbone pass gives the skips, `project` gives the same tokens
    embed = m.patch_embed
    last, skips = embed.backbone.forward_intermediates(x)
    assert [s.shape[1:] for s in skips] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    torch.testing.assert_close(embed.project(last), embed(x))


def test_freeze_patch_embed_freezes_the_projection_only() -> None:
    m = hybrid(freeze_patch_embed=True).train()
    assert not any(p.requires_grad for p in m.patch_embed.proj.parameters())
    assert all(p.requires_grad for p in m.patch_embed.backbone.parameters())
    m(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert m.patch_embed.proj.weight.grad is None
    assert m.patch_embed.backbone.stem.conv.weight.grad is not None


def test_num_classes_zero_reset_classifier_and_dynamic_size() -> None:
    x = torch.randn(2, 3, 64, 64)
    m = hybrid(num_classes=0)
    assert m(x).shape == (2, 64)
    torch.testing.assert_close(m(x), m.forward_features(x)[:, 0])
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    dyn = hybrid(dynamic_img_size=True, num_classes=0, global_pool="")
    assert dyn(torch.randn(1, 3, 96, 48)).shape == (1, 1 + 6 * 3, 64)


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        hybrid(img_size=100)
    with pytest.raises(ValueError, match="multiple of the backbone's stride"):
        hybrid(patch_size=24, img_size=48)
    with pytest.raises(ValueError, match="2D only"):
        hybrid(spatial_dims=3)
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        hybrid()(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="global_pool='token' needs class_token"):
        hybrid(class_token=False)


def test_hybrid_embed_checks_the_backbone_stride() -> None:
    bb = ResNetV2(depths=(1, 1), channels=(128, 256), num_classes=0, global_pool="")
    embed = HybridEmbed(bb, img_size=64, patch_size=16, embed_dim=32)
    assert embed.grid_size == (4, 4) and embed.proj.kernel_size == (2, 2)
    assert embed(torch.randn(1, 3, 64, 64)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="multiple"):
        HybridEmbed(bb, img_size=64, patch_size=4)


# -- ViT-g/14 with the MAP head ----------------------------------------------------------------
def test_vit_giant_is_the_paper_configuration(timm: ModuleType) -> None:
    with torch.device("meta"):
        m = medvit.create_model("vit_giant_patch14_224", num_classes=1000)
    assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (1408, 40, 16)
    assert m.blocks[0].mlp.fc1.out_features == 6144 and m.patch_size == (14, 14)
    assert m.global_pool == "map" and m.cls_token is None and m.attn_pool is not None
    for kw in (dict(global_pool="map", class_token=False), dict(global_pool="token", class_token=True)):
        with torch.device("meta"):
            ref = timm.create_model("vit_giant_patch14_224", num_classes=1000, **kw)
            ours = medvit.create_model("vit_giant_patch14_224", num_classes=1000, **kw)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), kw
    # the paper's 1011M counts the encoder, without the MAP head and the classifier
    encoder = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("attn_pool.", "head.")))
    assert round(encoder / 1e6) == 1011


@torch.no_grad()
def test_vit_giant_map_head_parity_and_frozen_patch_embed() -> None:
    TimmViT = require("timm.models.vision_transformer").VisionTransformer
    small = dict(img_size=28, embed_dim=64, depth=2, num_heads=4, num_classes=7)
    ref = _perturbed(TimmViT(**small, patch_size=14, mlp_ratio=48 / 11, global_pool="map", class_token=False))
    ours = load_timm(medvit.create_model("vit_giant_patch14_224", **small), ref.state_dict()).eval()
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    frozen = medvit.create_model("vit_giant_patch14_224", **small, freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())
    with torch.enable_grad():
        frozen(x).square().mean().backward()
    assert frozen.patch_embed.proj.weight.grad is None and frozen.attn_pool.latent.grad is not None


# -- 3D: standardised convs, the ResNet and the hybrid in volumes (the 3D TransUNet's encoder) ----
def test_std_conv3d_and_max_pool_same_in_3d() -> None:
    from medvit.layers.std_conv import MaxPoolSame, StdConv3d, std_conv_nd

    conv = StdConv3d(2, 4, 3, stride=2, padding="same", eps=1e-8)
    w = conv.weight
    var = w.var((1, 2, 3, 4), unbiased=False, keepdim=True)
    std_w = (w - w.mean((1, 2, 3, 4), keepdim=True)) / (var + 1e-8).sqrt()
    x = torch.randn(1, 2, 9, 10, 11)
    y = conv(x)
    assert y.shape == (1, 4, 5, 5, 6)
    # per axis TensorFlow pads 2 = (1, 1), 1 = (0, 1), 2 = (1, 1); F.pad lists the last axis first
    torch.testing.assert_close(y, F.conv3d(F.pad(x, (1, 1, 0, 1, 1, 1)), std_w, stride=2), atol=1e-5, rtol=0)
    assert std_conv_nd(2) is StdConv2d and std_conv_nd(3) is StdConv3d
    with pytest.raises(ValueError, match="2D and 3D"):
        std_conv_nd(1)
    pooled = MaxPoolSame(3, 3, 2)(-torch.rand(1, 1, 5, 6, 7) - 1.0)
    assert pooled.shape == (1, 1, 3, 3, 4) and (pooled < -1.0).all()
    assert isinstance(MaxPool2dSame(3), MaxPoolSame) and MaxPool2dSame(3, 2).kernel_size == (3, 3)


def test_resnetv2_3d_features_and_head() -> None:
    m = ResNetV2(depths=(1, 1), channels=(128, 256), num_classes=5, spatial_dims=3).eval()
    x = torch.randn(2, 3, 32, 32, 16)
    assert m(x).shape == (2, 5) and m.spatial_dims == 3 and m.img_size == (224, 224, 224)
    last, feats = m.forward_intermediates(x)
    assert [f.shape[1:] for f in feats] == [(64, 16, 16, 8), (128, 8, 8, 4), (256, 4, 4, 2)]
    torch.testing.assert_close(m.forward_head(last, pre_logits=True), last.mean((2, 3, 4)))
    assert m.stem.conv.kernel_size == (7, 7, 7) and m.stages[1].blocks[0].conv2.stride == (2, 2, 2)
    with pytest.raises(ValueError, match="2D or 3D"):
        ResNetV2(spatial_dims=1)


def test_hybrid_3d_variant_and_backbone_indices() -> None:
    tiny = tiny_overrides("vit_base_r50_s16_96_3d")
    m = medvit.create_model("vit_base_r50_s16_96_3d", **tiny).eval()
    assert (m.spatial_dims, m.in_chans, m.grid_size, m.num_classes) == (3, 1, (2, 2, 2), 0)
    x = torch.randn(2, 1, 32, 32, 32)
    assert m(x).shape == (2, 32)
    final, feats = m.forward_intermediates(x, indices=[1], backbone_indices=[0, 2])
    assert [f.shape[1:] for f in feats] == [(64, 16, 16, 16), (128, 4, 4, 4), (32, 2, 2, 2)]
    torch.testing.assert_close(final, m.forward_features(x))
    ref_skips = m.patch_embed.backbone.forward_intermediates(x, [0, 2], intermediates_only=True)
    for a, b in zip(feats[:2], ref_skips, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(feats[2], m.forward_intermediates(x, indices=[1], intermediates_only=True)[0])
    only = m.forward_intermediates(
        x, indices=[], backbone_indices=[1], output_fmt="NLC", intermediates_only=True
    )
    assert [f.shape for f in only] == [(2, 8 * 8 * 8, 128)]
    with torch.device("meta"):
        full = medvit.create_model("vit_base_r50_s16_96_3d")
    assert full.patch_embed.backbone.stem.conv.kernel_size == (7, 7, 7) and full.grid_size == (6, 6, 6)
    with pytest.raises(ValueError, match="2D or 3D"):
        medvit.create_model("vit_base_r50_s16_96_3d", spatial_dims=1)
