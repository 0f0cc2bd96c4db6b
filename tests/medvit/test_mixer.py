"""MLP-Mixer: timm parity, paper configurations, the common interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm

from helpers import require


SMALL = dict(img_size=64, embed_dim=64, depth=2, num_classes=7)


def mixer(**kw):
    return medvit.create_model("mixer_s16_224", **{**SMALL, **kw}).eval()


def _perturbed(ref: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # timm zero-initialises the head; make every tensor count
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref.eval()


def test_parameter_counts_match_timm_and_paper(timm: ModuleType) -> None:
    names = [n for n in medvit.list_models("mixer_*") if n in timm.list_models()]
    assert {"mixer_s16_224", "mixer_b16_224", "mixer_l16_224"} <= set(names)
    counts = {}
    for name in names:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            counts[name] = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert counts[name] == ref, name
    with torch.device("meta"):
        trunks = [medvit.create_model(f"mixer_{s}16_224", num_classes=0) for s in "sbl"]
    # the paper's Table 1 (without the classifier): S/16 18M, B/16 59M, L/16 207M
    assert [round(sum(p.numel() for p in t.parameters()) / 1e6) for t in trunks] == [18, 59, 207]
    with torch.device("meta"):
        blk = medvit.create_model("mixer_b16_224").blocks[0]
    # token MLP width D_S = 384, channel MLP width D_C = 3072 for B/16
    assert (blk.mlp_tokens.fc1.out_features, blk.mlp_channels.fc1.out_features) == (384, 3072)
    assert blk.mlp_tokens.fc1.in_features == 196


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [dict(), dict(mlp_ratio=(1.0, 2.0), patch_size=8), dict(global_pool="")])
def test_timm_parity_small(kwargs) -> None:
    TimmMixer = require("timm.models.mlp_mixer").MlpMixer
    timm_kw = {("num_blocks" if k == "depth" else k): v for k, v in {**SMALL, **kwargs}.items()}
    ref = _perturbed(TimmMixer(**timm_kw))
    ours = load_timm(mixer(**kwargs), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    final, feats = ours.forward_intermediates(x, norm=True)
    ref_final, ref_feats = ref.forward_intermediates(x, norm=True)
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    for a, b in zip(feats, ref_feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_full_size_s16(timm: ModuleType) -> None:
    # the registered S/16 configuration (width, depth, MLP widths) on a 112 x 112 input
    ref = _perturbed(timm.create_model("mixer_s16_224", img_size=112))
    ours = load_timm(medvit.create_model("mixer_s16_224", img_size=112), ref.state_dict()).eval()
    x = torch.randn(1, 3, 112, 112)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_checkpoint_at_another_resolution_is_refused() -> None:
    TimmMixer = require("timm.models.mlp_mixer").MlpMixer
    ref = TimmMixer(img_size=32, embed_dim=64, num_blocks=2, num_classes=7)
    with pytest.raises(ValueError, match=r"shape mismatch.*mlp_tokens"):
        load_timm(mixer(), ref.state_dict())


def test_forward_intermediates_shapes_and_options() -> None:
    m = mixer()
    x = torch.randn(2, 3, 64, 64)
    final, feats = m.forward_intermediates(x, indices=[0, -1])
    assert [f.shape for f in feats] == [(2, 64, 4, 4)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    tokens = m.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
    assert len(tokens) == 1 and tokens[0].shape == (2, 16, 64)
    torch.testing.assert_close(tokens[0], final)
    # the map is the token sequence laid out row-major on the patch grid
    nlc = m.forward_intermediates(x, [1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(feats[1].flatten(2).transpose(1, 2), nlc[0])
    early = m.forward_intermediates(x, [0], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], feats[0])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, [2])
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_head_pooling_and_reset_classifier() -> None:
    x = torch.randn(2, 3, 64, 64)
    m = mixer()
    assert m(x).shape == (2, 7) and m.num_features == 64 and m.spatial_dims == 2
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats.mean(1))
    pooled = mixer(num_classes=0)
    assert pooled(x).shape == (2, 64)
    torch.testing.assert_close(pooled(x), pooled.forward_features(x).mean(1))
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.num_classes == 3
    m.reset_classifier(0, global_pool="")
    assert m(x).shape == (2, 16, 64)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(5, global_pool="token")


def test_freeze_patch_embed() -> None:
    m = mixer(freeze_patch_embed=True).train()
    assert not any(p.requires_grad for p in m.stem.parameters())
    m(torch.randn(2, 3, 64, 64)).square().mean().backward()
    assert m.stem.proj.weight.grad is None and m.blocks[0].mlp_tokens.fc1.weight.grad is not None


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        mixer(img_size=60)
    with pytest.raises(ValueError, match="global_pool"):
        mixer(global_pool="token")
    with pytest.raises(ValueError, match="mlp_ratio"):
        mixer(mlp_ratio=(0.5, 4.0, 1.0))
    with pytest.raises(ValueError, match="does not match the model's img_size"):
        mixer()(torch.randn(1, 3, 32, 32))


def test_drop_path_schedule_rises_to_the_rate() -> None:
    m = mixer(depth=3, drop_path_rate=0.2)
    assert isinstance(m.blocks[0].drop_path, torch.nn.Identity)
    assert [b.drop_path.drop_prob for b in m.blocks[1:]] == pytest.approx([0.1, 0.2])
