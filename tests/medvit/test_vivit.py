"""ViViT: paper configurations, the four attention factorisations, and 2D inflation.

timm has no ViViT, so there is no timm parity test: Model 4's attention is checked
against an explicit masked joint attention, and inflation against the image ViT it
comes from (identical frames must give the image model's features).
"""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.convert import inflate_image_to_video
from medvit.layers.factorised_attention import FactorisedDotProductAttention
from medvit.models.image.vit import VisionTransformer
from medvit.models.video.vivit import ViViT

SMALL = dict(img_size=32, patch_size=8, num_frames=4, embed_dim=32, depth=2, temporal_depth=1, num_heads=2,
             num_classes=5)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _clip(b: int = 2, t: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, t, size, size)


# Paper Table 2 (ViViT-B, 16x2 tubelets): 88.9M / 115.1M / 117.3M / 88.9M parameters.
@pytest.mark.parametrize(
    "name,millions",
    [
        ("vivit_b_16x2_st", 88.9),
        ("vivit_b_16x2_fe", 115.1),
        ("vivit_b_16x2_fsa", 117.3),
        ("vivit_b_16x2_fdp", 88.9),
    ],
)
def test_parameter_counts_match_paper(name: str, millions: float) -> None:
    with torch.device("meta"):
        model = medvit.create_model(name)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.1
    assert model.grid_size == (16, 14, 14) and model.num_frames == 32 and model.img_size == (224, 224)


def test_large_configuration() -> None:
    with torch.device("meta"):
        model = medvit.create_model("vivit_l_16x2_fe")
    assert (model.embed_dim, len(model.blocks), len(model.temporal_blocks)) == (1024, 24, 4)
    assert model.blocks[0].attn.num_heads == 16


@pytest.mark.parametrize("attention_type", ["st", "fe", "fsa", "fdp"])
def test_interface(attention_type: str) -> None:
    model = ViViT(attention_type=attention_type, **SMALL).eval()
    x = _clip()
    assert model(x).shape == (2, 5)
    final, feats = model.forward_intermediates(x)
    assert len(feats) == 2 and all(f.shape == (2, 32, 2, 4, 4) for f in feats)
    n_final = {"st": 1 + 32, "fe": 1 + 2, "fsa": 32, "fdp": 32}[attention_type]
    assert final.shape == (2, n_final, 32)
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
    assert len(nlc) == 1 and nlc[0].shape == (2, 32, 32)
    torch.testing.assert_close(nlc[0], feats[-1].flatten(2).transpose(1, 2))
    early = model.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], feats[0])
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, 32)
    assert ViViT(attention_type=attention_type, **{**SMALL, "num_classes": 0})(x).shape == (2, 32)


def test_uniform_frame_sampling_and_freeze() -> None:
    model = ViViT(**{**SMALL, "tubelet_size": 1}, freeze_patch_embed=True)
    assert model.grid_size == (4, 4, 4)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("patch_embed"))
    assert model(_clip()).shape == (2, 5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        ViViT(**{**SMALL, "img_size": 30})
    with pytest.raises(ValueError, match="does not divide"):
        ViViT(**{**SMALL, "num_frames": 3})
    with pytest.raises(ValueError, match="attention_type"):
        ViViT(**{**SMALL, "attention_type": "xyz"})
    with pytest.raises(ValueError, match="no class token"):
        ViViT(**{**SMALL, "attention_type": "fsa", "global_pool": "token"})
    with pytest.raises(ValueError, match="even"):
        ViViT(**{**SMALL, "attention_type": "fdp", "num_heads": 1})
    with pytest.raises(ValueError, match="clip"):
        ViViT(**SMALL)(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="tubelet_init"):
        inflate_image_to_video(ViViT(**SMALL), {}, tubelet_init="middle")


def test_factorised_dot_product_matches_masked_joint_attention() -> None:
    torch.manual_seed(0)
    b, t, n, d, heads = 2, 3, 5, 16, 4
    attn = _perturb(FactorisedDotProductAttention(d, num_heads=heads, qkv_bias=True))
    x = torch.randn(b, t, n, d)
    q, k, v = attn.qkv(x.reshape(b, t * n, d)).reshape(b, t * n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    frame = torch.arange(t).repeat_interleave(n)
    loc = torch.arange(n).repeat(t)
    same_frame = frame[:, None] == frame[None]
    same_loc = loc[:, None] == loc[None]
    # the first half of the heads is spatial, the second temporal
    mask = torch.stack([same_frame] * (heads // 2) + [same_loc] * (heads // 2))
    w = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).masked_fill(~mask, float("-inf")).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(b, t * n, d)).reshape(b, t, n, d)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tubelet_init", ["central", "average"])
def test_fe_inflated_from_vit_matches_image_per_frame(tubelet_init: str) -> None:
    """Identical frames: every spatial block's patch tokens equal the image ViT's."""
    torch.manual_seed(0)
    image = _perturb(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3))
    video = inflate_image_to_video(ViViT(attention_type="fe", **SMALL), image.state_dict(), tubelet_init).eval()
    frame = torch.randn(2, 3, 32, 32)
    clip = frame.unsqueeze(2).repeat(1, 1, 4, 1, 1)
    ref = image.forward_intermediates(frame, norm=True, intermediates_only=True)
    ours = video.forward_intermediates(clip, norm=True, intermediates_only=True)
    for r, o in zip(ref, ours):
        for i in range(o.shape[2]):
            torch.testing.assert_close(o[:, :, i], r, atol=1e-5, rtol=0)


def test_fsa_inflated_from_vit_matches_image_per_frame() -> None:
    """Zero temporal output projection: identical frames give the image ViT's pooled
    features (GAP image model, as FSA has no class token) and patch tokens."""
    torch.manual_seed(0)
    image = _perturb(
        VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0,
                          class_token=False, global_pool="avg", fc_norm=False)
    )
    video = ViViT(attention_type="fsa", **{**SMALL, "num_classes": 0})
    video = inflate_image_to_video(video, image.state_dict(), "central").eval()
    assert all(not b.temporal_attn.proj.weight.detach().any() for b in video.blocks)
    frame = torch.randn(2, 3, 32, 32)
    clip = frame.unsqueeze(2).repeat(1, 1, 4, 1, 1)
    torch.testing.assert_close(video(clip), image(frame), atol=1e-5, rtol=0)
    ref = image.forward_intermediates(frame, intermediates_only=True)[-1]
    ours = video.forward_intermediates(clip, intermediates_only=True)[-1]
    torch.testing.assert_close(ours[:, :, 1], ref, atol=1e-5, rtol=0)


def test_inflation_rejects_mismatched_checkpoint() -> None:
    image = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
    with pytest.raises(ValueError, match="blocks"):
        inflate_image_to_video(ViViT(**SMALL), image.state_dict())
    wide = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="does not fit"):
        inflate_image_to_video(ViViT(**SMALL), wide.state_dict())
