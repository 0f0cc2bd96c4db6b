"""TransUNet: paper configuration, timm parity of its hybrid encoder, decoder wiring, 2D/3D shapes."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import medvit
from medvit.convert import load_timm
from medvit.models.volume.transunet import TransUNet

from helpers import require


SMALL_ENCODER = dict(embed_dim=64, depth=2, num_heads=4, backbone_depths=(1, 1, 1))
SMALL = dict(head_channels=16, decoder_channels=(16, 8, 8, 4), encoder_args=SMALL_ENCODER)


def small_2d(**kw) -> TransUNet:
    return medvit.create_model("transunet_r50_vit_b16", **{"img_size": 64, **SMALL, **kw})


def small_3d(**kw) -> TransUNet:
    enc = {**SMALL_ENCODER, "embed_dim": 32, "num_heads": 2, "backbone_channels": (128, 128, 128)}
    args = {"img_size": 32, **SMALL, "encoder_args": enc, **kw}
    return medvit.create_model("transunet3d_r50_vit_b16", **args)


def timm_hybrid(depths, **kw) -> torch.nn.Module:
    """timm's R50+ViT hybrid as `vit_base_r50_s16_224` builds it, without class token: TransUNet's encoder."""
    TimmHybridEmbed = require("timm.layers").HybridEmbed
    TimmResNetV2 = require("timm.models.resnetv2").ResNetV2
    TimmStdConv2dSame = require("timm.layers").StdConv2dSame
    TimmViT = require("timm.models.vision_transformer").VisionTransformer
    backbone = TimmResNetV2(
        layers=depths, num_classes=0, global_pool="", preact=False, stem_type="same",
        conv_layer=partial(TimmStdConv2dSame, eps=1e-8),
    )
    ref = TimmViT(patch_size=1, embed_layer=partial(TimmHybridEmbed, backbone=backbone), **kw)
    with torch.no_grad():  # timm zero-initialises some tensors; make every one count
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref.eval()


def test_paper_configuration_and_parameter_count() -> None:
    with torch.device("meta"):
        model = medvit.create_model("transunet_r50_vit_b16")
        rgb = medvit.create_model("transunet_r50_vit_b16", in_chans=3)
    enc = model.encoder
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (768, 12, 12)
    assert [len(s.blocks) for s in enc.patch_embed.backbone.stages] == [3, 4, 9]
    assert enc.patch_size == (16, 16)
    assert enc.cls_token is None and enc.pos_embed.shape == (1, 14 * 14, 768)
    assert (model.img_size, model.in_chans, model.num_classes, model.spatial_dims) == ((224, 224), 1, 9, 2)
    # skips by stride: stage 2 (1/8), stage 1 (1/4), the stem before its pool (1/2); none at 1/1
    assert model.skip_indices == (2, 1, 0)
    assert [b.conv1.in_channels for b in model.blocks] == [512 + 512, 256 + 256, 128 + 64, 64]
    assert [b.conv2.out_channels for b in model.blocks] == [256, 128, 64, 16]
    assert model.conv_more[0].in_channels == 768 and model.conv_more[0].out_channels == 512
    assert model.head.kernel_size == (3, 3) and model.head.out_channels == 9
    assert enc.pos_drop.p == 0.1 and enc.blocks[0].mlp.drop1.p == 0.1  # the official dropout
    with torch.device("meta"):
        no_drop = medvit.create_model("transunet_r50_vit_b16", encoder_args=dict(pos_drop_rate=0.0))
    assert no_drop.encoder.pos_drop.p == 0.0 and no_drop.encoder.blocks[0].mlp.drop1.p == 0.1
    # The TransUNet paper prints no parameter count; 105.28M is the figure later papers
    # (Swin-Unet, MISSFormer, ...) report for the official code, whose stem takes 3 channels
    # (it repeats grey images). Ours with a 3-channel stem: 105,277,081 = 105.28M.
    n_rgb = sum(p.numel() for p in rgb.parameters())
    assert n_rgb == 105_277_081 and round(n_rgb / 1e4) == 10528
    # the grey stem has 2 * 64 * 7 * 7 weights fewer
    assert sum(p.numel() for p in model.parameters()) == n_rgb - 2 * 64 * 49


def test_3d_configuration() -> None:
    with torch.device("meta"):
        model = medvit.create_model("transunet3d_r50_vit_b16")
    assert (model.img_size, model.in_chans, model.num_classes, model.spatial_dims) == ((96,) * 3, 1, 14, 3)
    assert model.encoder.patch_size == (16, 16, 16) and model.encoder.grid_size == (6, 6, 6)
    assert model.encoder.patch_embed.backbone.stem.conv.kernel_size == (7, 7, 7)
    assert model.head.kernel_size == (3, 3, 3) and model.skip_indices == (2, 1, 0)


@torch.no_grad()
@pytest.mark.parametrize("depths", [(3, 4, 9), (1, 1, 1)])
def test_encoder_matches_timm_hybrid_hidden_states(depths) -> None:
    """Loaded with a timm hybrid's weights, the encoder gives timm's hidden states and skips."""
    ref = timm_hybrid(depths, img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                      class_token=False, global_pool="")
    model = small_2d(in_chans=3, encoder_args={**SMALL_ENCODER, "backbone_depths": depths}).eval()
    load_timm(model.encoder, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    hidden, skips = model.encoder.forward_intermediates(x, indices=[], backbone_indices=[0, 1, 2])
    torch.testing.assert_close(hidden, ref.forward_features(x), atol=1e-4, rtol=0)
    ref_skips = ref.patch_embed.backbone.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
    assert [s.shape[1:] for s in skips] == [(64, 32, 32), (256, 16, 16), (512, 8, 8)]
    for a, b in zip(skips, ref_skips, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_decoder_is_the_official_cascaded_upsampler() -> None:
    """Logits = the official DecoderCup + SegmentationHead, written out with functional ops
    over timm's hidden states and skips (the decoder's weights, perturbed BN statistics)."""
    ref = timm_hybrid((1, 1, 1), img_size=64, embed_dim=64, depth=2, num_heads=4, num_classes=0,
                      class_token=False, global_pool="")
    model = small_2d(in_chans=3, num_classes=5)
    load_timm(model.encoder, ref.state_dict())
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.normal_(1, 0.1)
            m.bias.normal_(0, 0.1)
    model.eval()
    x = torch.randn(2, 3, 64, 64)

    def conv_bn_relu(y, conv, bn):
        y = F.conv2d(y, conv.weight, conv.bias, padding=1)
        return F.relu(F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=bn.eps))

    hidden = ref.forward_features(x)
    backbone = ref.patch_embed.backbone
    stem, stage1, stage2 = backbone.forward_intermediates(x, [0, 1, 2], intermediates_only=True)
    y = conv_bn_relu(hidden.transpose(1, 2).reshape(2, 64, 4, 4), model.conv_more[0], model.conv_more[1])
    for block, skip in zip(model.blocks, [stage2, stage1, stem, None], strict=True):
        y = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True)  # nn.UpsamplingBilinear2d
        if skip is not None:
            y = torch.cat([y, skip], 1)
        y = conv_bn_relu(conv_bn_relu(y, block.conv1, block.norm1), block.conv2, block.norm2)
    expected = F.conv2d(y, model.head.weight, model.head.bias, padding=1)
    out = model(x)
    assert out.shape == (2, 5, 64, 64) and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_skip", [0, 1, 2])
def test_fewer_skips(n_skip) -> None:
    model = small_2d(n_skip=n_skip, img_size=32)
    assert len(model.skip_indices) == n_skip
    skip_chans = [512, 256, 64][:n_skip] + [0] * (4 - n_skip)
    assert [b.conv1.in_channels - i for b, i in zip(model.blocks, (16, 16, 8, 8))] == skip_chans
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 9, 32, 32)


def test_2d_shapes_other_sizes_and_gradients() -> None:
    model = small_2d(in_chans=3, num_classes=4)  # a thin slab of 3 slices as channels
    x = torch.randn(2, 3, 48, 80)  # not img_size, a multiple of 16: the position table is resampled
    out = model(x)
    assert out.shape == (2, 4, 48, 80)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.encoder.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_3d_shapes_and_gradients() -> None:
    model = small_3d(num_classes=3)
    assert model.memory_format == torch.channels_last_3d
    x = torch.randn(1, 1, 32, 48, 32)
    out = model(x)
    assert out.shape == (1, 3, 32, 48, 32) and out.is_contiguous()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.encoder.patch_embed.backbone.stem.conv.weight.grad.abs().sum() > 0


def test_built_encoder_is_accepted() -> None:
    enc = medvit.create_model(
        "vit_base_r50_s16_224", img_size=32, num_classes=0, global_pool="", class_token=False, **SMALL_ENCODER
    )
    model = TransUNet(enc, in_chans=3, img_size=32, head_channels=8, decoder_channels=(8, 8, 8, 4))
    assert model.encoder is enc and model(torch.randn(1, 3, 32, 32)).shape == (1, 9, 32, 32)
    with pytest.raises(ValueError, match="3 input channels, the model 2D with 1"):
        TransUNet(enc, in_chans=1, img_size=32)
    with pytest.raises(ValueError, match="hybrid encoder"):
        plain = medvit.create_model("vit_base_patch16_224", img_size=32, embed_dim=32, depth=1, num_heads=2)
        TransUNet(plain, in_chans=3, img_size=32)


def test_bad_arguments_raise_value_error() -> None:
    model = small_2d(img_size=32)
    with pytest.raises(ValueError, match="multiple of TransUNet's total stride 16"):
        model(torch.randn(1, 1, 40, 32))
    with pytest.raises(ValueError, match="expected a 4D input"):
        model(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="n_skip"):
        small_2d(n_skip=4)
    with pytest.raises(ValueError, match="decoder blocks upsample by 8"):
        small_2d(decoder_channels=(16, 8, 4))
    with pytest.raises(ValueError, match="num_classes"):
        small_2d(num_classes=0)
    with pytest.raises(ValueError, match="2D or 3D"):
        small_2d(spatial_dims=1)
    with pytest.raises(ValueError, match="2D only"):
        small_2d(encoder="vit_base_r50_s16_224", spatial_dims=3, img_size=32)
    with pytest.raises(ValueError, match="img_size"):
        small_3d(img_size=(32, 32))
