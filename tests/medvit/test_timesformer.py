"""TimeSformer: configurations, attention mechanisms, interface and ViT inflation.

There is no independent reference implementation installed (timm has no TimeSformer), so
the attention schemes are tested by what they may and may not mix.
"""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.convert import inflate_image_to_video
from medvit.layers.video_attention import GROUPINGS, group_tokens
from medvit.models.image.vit import VisionTransformer
from medvit.models.video.timesformer import ATTENTION_TYPES, TimeSformer

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, num_frames=4)


def _small(**kw: object) -> TimeSformer:
    torch.manual_seed(0)
    model = TimeSformer(**{**SMALL, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # zero-initialised temporal parts count too
    return model


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registered_configurations() -> None:
    assert medvit.list_models("timesformer_*") == ["timesformer_base", "timesformer_hr", "timesformer_l"]
    expected = {
        "timesformer_base": (8, (224, 224)),
        "timesformer_hr": (16, (448, 448)),
        "timesformer_l": (96, (224, 224)),
    }
    for name, (frames, size) in expected.items():
        with torch.device("meta"):
            model = medvit.create_model(name)
        assert (model.num_frames, model.img_size, model.attention_type) == (frames, size, "divided")
        assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (768, 12, 12)
        assert model.spatial_dims == 2 and model.num_classes == 400


def test_parameter_counts_near_paper() -> None:
    # Table 1 of the paper: space 85.9M, joint 85.9M, divided 121.4M, sparse 121.4M, axial 156.8M
    paper = {"space": 85.9e6, "joint": 85.9e6, "divided": 121.4e6, "sparse": 121.4e6, "axial": 156.8e6}
    for attention_type, count in paper.items():
        with torch.device("meta"):
            model = medvit.create_model("timesformer_base", attention_type=attention_type)
        assert abs(_params(model) - count) < 0.3e6, attention_type
    with torch.device("meta"):
        divided = medvit.create_model("timesformer_base")
        vit = VisionTransformer(num_classes=400)
    # ViT-B/16 + per block (temporal attention 4D^2+4D, temporal_fc D^2+D, norm 2D) + time_embed
    d = 768
    assert _params(divided) == _params(vit) + 12 * (5 * d * d + 7 * d) + 8 * d


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_forward_shapes_and_intermediates(attention_type: str) -> None:
    model = _small(attention_type=attention_type)
    x = torch.randn(2, 3, 4, 32, 32)
    assert model(x).shape == (2, 10)
    final, feats = model.forward_intermediates(x, indices=[0, 1])
    assert final.shape == (2, 1 + 4 * 16, 32)
    assert [f.shape for f in feats] == [(2, 32, 4, 4, 4)] * 2
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert [f.shape for f in nlc] == [(2, 64, 32)]
    torch.testing.assert_close(nlc[0], feats[1].flatten(2).transpose(1, 2))
    torch.testing.assert_close(final, model.forward_features(x))
    early = model.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], feats[0])


def test_space_attention_keeps_frames_independent() -> None:
    model = _small(attention_type="space")
    x = torch.randn(1, 3, 4, 32, 32)
    y = x.clone()
    y[:, :, 2] = torch.randn_like(y[:, :, 2])
    fx = model.forward_intermediates(x, intermediates_only=True)[-1]
    fy = model.forward_intermediates(y, intermediates_only=True)[-1]
    torch.testing.assert_close(fx[:, :, [0, 1, 3]], fy[:, :, [0, 1, 3]])
    assert (fx[:, :, 2] - fy[:, :, 2]).abs().max() > 1e-3


def test_divided_temporal_attention_mixes_only_same_position() -> None:
    model = _small(attention_type="divided")
    blk = model.blocks[0]
    with torch.no_grad():
        blk.temporal_fc.weight.copy_(torch.eye(32))  # make the temporal residual visible
    grid = model.token_grid
    tokens = torch.randn(1, 64, 32)
    seq, ungroup = group_tokens(tokens, grid, GROUPINGS["time"])
    assert seq.shape == (16, 4, 32)
    torch.testing.assert_close(ungroup(seq), tokens)
    # the temporal step alone: perturb token (t=2, h=1, w=3); only position (1, 3) changes

    def temporal(x: torch.Tensor) -> torch.Tensor:
        s, ug = group_tokens(x, grid, GROUPINGS["time"])
        return x + blk.temporal_fc(ug(blk.temporal_attn(blk.temporal_norm1(s))))

    moved = tokens.clone()
    moved[0, 2 * 16 + 1 * 4 + 3] += torch.randn(32)
    diff = (temporal(moved) - temporal(tokens)).abs().amax(-1).reshape(4, 4, 4)
    assert (diff[:, 1, 3] > 1e-4).all()
    diff[:, 1, 3] = 0
    assert diff.max() < 1e-6


def test_sparse_local_windows_are_quarters_of_all_frames() -> None:
    grid = (4, 4, 6)
    idx = torch.arange(96, dtype=torch.float32).reshape(1, 96, 1)
    local, _ = group_tokens(idx, grid, GROUPINGS["local"])
    assert local.shape == (4, 4 * 2 * 3, 1)
    t, h, w = (local[0, :, 0].long() // 24), (local[0, :, 0].long() // 6) % 4, local[0, :, 0].long() % 6
    assert set(t.tolist()) == {0, 1, 2, 3} and set(h.tolist()) == {0, 1} and set(w.tolist()) == {0, 1, 2}
    glob, ungroup = group_tokens(idx, grid, GROUPINGS["global"])
    assert glob.shape == (8, 2 * 2 * 3, 1)
    first = glob[0, :, 0].long()
    assert ((first // 24) % 2 == 0).all() and (((first // 6) % 4) % 2 == 0).all() and ((first % 6) % 2 == 0).all()
    torch.testing.assert_close(ungroup(glob), idx)


def test_axial_attention_order() -> None:
    model = _small(attention_type="axial")
    blk = model.blocks[0]
    assert [name for name, _ in blk.steps] == ["temporal", "width"]
    assert blk.final == GROUPINGS["height"]


@pytest.mark.parametrize("attention_type", ["divided", "space"])
def test_inflated_vit_on_identical_frames_gives_image_features(attention_type: str) -> None:
    torch.manual_seed(1)
    image = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        for p in image.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    video = TimeSformer(**{**SMALL, "attention_type": attention_type}).eval()
    inflate_image_to_video(video, image.state_dict())
    frame = torch.randn(2, 3, 32, 32)
    clip = frame.unsqueeze(2).expand(-1, -1, 4, -1, -1)
    with torch.no_grad():
        ref, out = image.forward_features(frame), video.forward_features(clip)
        # class token = pooled features; patch tokens of every frame = the image's
        torch.testing.assert_close(out[:, 0], ref[:, 0], atol=1e-5, rtol=0)
        per_frame = ref[:, None, 1:].expand(-1, 4, -1, -1)
        torch.testing.assert_close(out[:, 1:].reshape(2, 4, 16, 32), per_frame, atol=1e-5, rtol=0)
        torch.testing.assert_close(video(clip), image(frame), atol=1e-5, rtol=0)
    if attention_type == "divided":
        assert video.time_embed.abs().max() == 0
        torch.testing.assert_close(video.blocks[1].temporal_attn.qkv.weight, image.blocks[1].attn.qkv.weight)
        assert video.blocks[1].temporal_fc.weight.abs().max() == 0


def test_inflation_resamples_position_table_and_rejects_other_widths() -> None:
    image = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    video = TimeSformer(**SMALL)
    inflate_image_to_video(video, image.state_dict(), tubelet_init="average")
    assert video.pos_embed.shape == (1, 17, 32)
    wide = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match="width"):
        inflate_image_to_video(video, wide.state_dict())


def test_reset_classifier_num_classes_zero_and_freeze() -> None:
    model = _small()
    x = torch.randn(1, 3, 4, 32, 32)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5) and model.num_classes == 5
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (1, 32)
    torch.testing.assert_close(model(x), model.forward_features(x)[:, 1:].mean(1))
    pooled = TimeSformer(**{**SMALL, "num_classes": 0})
    assert pooled(x).shape == (1, pooled.num_features)
    frozen = TimeSformer(**SMALL, freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.patch_embed.parameters())
    assert all(p.requires_grad for p in frozen.blocks.parameters())


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="attention_type"):
        TimeSformer(**SMALL, attention_type="spacetime")
    with pytest.raises(ValueError, match="does not divide"):
        TimeSformer(**{**SMALL, "img_size": 36})
    with pytest.raises(ValueError, match="sparse attention cannot cut"):
        TimeSformer(**{**SMALL, "num_frames": 3, "attention_type": "sparse"})
    model = TimeSformer(**SMALL)
    with pytest.raises(ValueError, match="frames"):
        model(torch.randn(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="clip"):
        model(torch.randn(1, 3, 32, 32))
