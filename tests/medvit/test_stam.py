"""STAM: parity with a timm-built reference, inflation from a ViT, interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
from helpers import require
from tiny_configs import tiny_overrides

import medvit
from medvit.convert import inflate_image_to_video
from medvit.models.image.vit import VisionTransformer


def _tiny(**kw: object) -> torch.nn.Module:
    return medvit.create_model("stam_base_patch16_224_16f",
                               **{**tiny_overrides("stam_base_patch16_224_16f"), **kw})


def test_parity_with_timm_vit_and_blocks(timm: ModuleType) -> None:
    TimmBlock = require("timm.models.vision_transformer").Block
    torch.manual_seed(0)
    model = _tiny(embed_dim=48, depth=2, num_heads=3, temporal_heads=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    spatial = timm.create_model("vit_base_patch16_224", img_size=32, embed_dim=48, depth=2, num_heads=3,
                                num_classes=0).eval()
    spatial.load_state_dict({k[len("spatial."):]: v for k, v in model.state_dict().items()
                             if k.startswith("spatial.")})
    blocks = torch.nn.Sequential(*[TimmBlock(48, 4, qkv_bias=True, norm_layer=torch.nn.LayerNorm)
                                   for _ in range(2)]).eval()
    blocks.load_state_dict({k[len("temporal_blocks."):]: v for k, v in model.state_dict().items()
                            if k.startswith("temporal_blocks.")})
    for m in blocks.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        cls = spatial(x.transpose(1, 2).reshape(8, 3, 32, 32)).reshape(2, 4, 48)
        z = torch.cat((model.cls_token.expand(2, -1, -1), cls), 1) + model.pos_embed
        ref = model.head(model.norm(blocks(z))[:, 0])
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=0)


def test_parameter_count_is_vit_b_plus_six_blocks(timm: ModuleType) -> None:
    TimmBlock = require("timm.models.vision_transformer").Block
    with torch.device("meta"):
        model = medvit.create_model("stam_base_patch16_224_16f", num_classes=400)
        vit = timm.create_model("vit_base_patch16_224", num_classes=0)
        block = TimmBlock(768, 8, qkv_bias=True)
    expected = (sum(p.numel() for p in vit.parameters()) + 6 * sum(p.numel() for p in block.parameters())
                + 17 * 768 + 768 + 2 * 768 + 768 * 400 + 400)
    assert sum(p.numel() for p in model.parameters()) == expected == 128_648_848


def test_inflation_identical_frames_give_image_features() -> None:
    torch.manual_seed(0)
    image = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    video = inflate_image_to_video(_tiny(), image.state_dict()).eval()
    img = torch.randn(2, 3, 32, 32)
    clip = img[:, :, None].expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        # per-frame class tokens (the spatial ViT's pooled features) equal the image model's
        ref = image.eval().forward_head(image.forward_features(img), pre_logits=True)
        frames = video.frame_tokens(clip)
        for t in range(4):
            torch.testing.assert_close(frames[:, t], ref, atol=1e-5, rtol=0)


def test_forward_intermediates_and_interface() -> None:
    model = _tiny().eval()
    x = torch.randn(2, 3, 4, 32, 32)
    final, feats = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 2, 2)] * 2
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert [tuple(f.shape) for f in nlc] == [(2, 16, 32)]
    assert model(x).shape == (2, 10)
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    assert _tiny(num_classes=0)(x).shape == (2, 32)
    frozen = _tiny(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.spatial.patch_embed.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        _tiny(img_size=40)
    with pytest.raises(ValueError, match="expected input"):
        _tiny()(torch.randn(1, 3, 3, 32, 32))
