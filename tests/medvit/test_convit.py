"""ConViT: parity with timm, GPSA's locality initialisation, the common interface."""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm
from medvit.layers.gpsa import GPSA, relative_positions_2d

from helpers import require


# timm's embed_dim is per head; ours is the token width
SMALL = dict(img_size=64, depth=4, num_heads=4, local_up_to_layer=2, num_classes=7)
OURS = dict(SMALL, embed_dim=64)
REF = dict(SMALL, embed_dim=16)


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    timm = require("timm")
    ref = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():  # timm zero-initialises some tensors; make every one count
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def convit(**kw) -> torch.nn.Module:
    return medvit.create_model("convit_tiny", **{**OURS, **kw}).eval()


@torch.no_grad()
@pytest.mark.parametrize("kwargs", [{}, dict(global_pool="avg"), dict(qkv_bias=True, locality_strength=2.0)])
def test_timm_parity_small(kwargs) -> None:
    ref = _perturbed("convit_tiny", **REF, **kwargs)
    ours = load_timm(convit(**kwargs), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_intermediates_across_the_class_token_insertion() -> None:
    ref = _perturbed("convit_tiny", **REF)
    ours = load_timm(convit(), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    final, feats = ours.forward_intermediates(x, indices=[0, 1, 2, 3])
    ref_final, ref_feats = ref.forward_intermediates(x, indices=[0, 1, 2, 3])
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    assert [f.shape for f in feats] == [(2, 64, 4, 4)] * 4
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_full_size_tiny() -> None:
    ref = _perturbed("convit_tiny")
    ours = load_timm(medvit.create_model("convit_tiny"), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    names = medvit.list_models("convit_*")
    assert names == ["convit_base", "convit_small", "convit_tiny"]
    for name in names:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


def test_paper_configuration() -> None:
    with torch.device("meta"):
        m = medvit.create_model("convit_small")
    gpsa = [isinstance(b.attn, GPSA) for b in m.blocks]
    assert gpsa == [True] * 10 + [False] * 2
    assert m.embed_dim == 432 and m.blocks[0].attn.num_heads == 9
    assert m.pos_embed.shape == (1, 196, 432)  # patch tokens only


def test_locality_initialisation_matches_timm(timm: ModuleType) -> None:
    ref = timm.create_model("convit_tiny", **{**REF, "num_heads": 9, "embed_dim": 8}, locality_strength=1.5)
    ours = convit(num_heads=9, embed_dim=72, locality_strength=1.5)
    ref_attn, attn = ref.blocks[0].attn, ours.blocks[0].attn
    torch.testing.assert_close(attn.pos_proj.weight, ref_attn.pos_proj.weight)
    torch.testing.assert_close(attn.v.weight, torch.eye(72))
    # head 4 is the kernel's centre: its positional attention peaks on the query itself
    pos = attn.positional_attention(torch.device("cpu"), torch.float32)
    assert (pos[4].argmax(dim=-1) == torch.arange(16)).all()
    torch.testing.assert_close(ours.gating(), torch.full((2, 9), 1 / (1 + math.exp(-1))))


def test_relative_positions_non_square_grid() -> None:
    rel = relative_positions_2d((2, 3))
    assert rel.shape == (6, 6, 3)
    # token 0 is (y=0, x=0), token 5 is (y=1, x=2)
    torch.testing.assert_close(rel[0, 5], torch.tensor([2.0, 1.0, 5.0]))
    torch.testing.assert_close(rel[5, 0], torch.tensor([-2.0, -1.0, 5.0]))
    m = convit(img_size=(32, 48), num_classes=0)
    assert m(torch.randn(1, 3, 32, 48)).shape == (1, 64)


def test_interface() -> None:
    m = convit()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 16, 64)
    torch.testing.assert_close(m(x), m.forward_head(feats))
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])
    nlc = m.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert [f.shape for f in nlc] == [(2, 16, 64)] * 2
    with_prefix = m.forward_intermediates(x, [1, 2], intermediates_only=True, return_prefix_tokens=True)
    assert [p.shape[1] for _, p in with_prefix] == [0, 1]  # the class token joins at block 2
    early = m.forward_intermediates(x, [1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], m.forward_intermediates(x, [1], intermediates_only=True)[0])
    maps = m.attention_maps(x)
    assert [a.shape for a in maps] == [(2, 4, 16, 16)] * 2 + [(2, 4, 17, 17)] * 2
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    m.reset_classifier(0, global_pool="avg")
    assert m(x).shape == (2, 64)
    assert (m.num_features, m.spatial_dims, m.in_chans, m.img_size) == (64, 2, 3, (64, 64))
    assert convit(num_classes=0)(x).shape == (2, 64)


def test_freeze_patch_embed() -> None:
    m = convit(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    m(torch.randn(1, 3, 64, 64)).sum().backward()
    assert m.blocks[0].attn.gating_param.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("convit_tiny", img_size=100)
    with pytest.raises(ValueError, match="local_up_to_layer"):
        convit(local_up_to_layer=5)
    with pytest.raises(ValueError, match="needs an MHSA block"):
        convit(local_up_to_layer=4)
    with pytest.raises(ValueError, match="must divide"):
        convit(num_heads=5)
    assert convit(local_up_to_layer=4, global_pool="avg")(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(ValueError, match="does not match"):
        convit()(torch.randn(1, 3, 32, 32))
