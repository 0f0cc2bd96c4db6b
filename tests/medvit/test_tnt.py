"""TNT: parity with timm (current layout), the pixel embedding, the common interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm

from helpers import require


SMALL = dict(img_size=64, embed_dim=48, inner_dim=8, depth=3, num_classes=7)


def _perturbed(name: str, **kwargs) -> torch.nn.Module:
    timm = require("timm")
    ref = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in ref.parameters():  # timm zero-initialises some tensors; make every one count
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def tnt(**kw) -> torch.nn.Module:
    return medvit.create_model("tnt_s_patch16_224", **{**SMALL, "num_heads": 4, **kw}).eval()


@torch.no_grad()
@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(global_pool="avg", qkv_bias=True), dict(patch_size=8, first_stride=2, num_heads_inner=2)],
)
def test_timm_parity_small(kwargs) -> None:
    ref_kwargs = {("num_heads_outer" if k == "num_heads" else k): v for k, v in kwargs.items()}
    ref = _perturbed("tnt_s_patch16_224", **SMALL, num_heads_outer=4, **ref_kwargs)
    ours = load_timm(tnt(**kwargs), ref.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    final, feats = ours.forward_intermediates(x, indices=[0, 2])
    ref_final, ref_feats = ref.forward_intermediates(x, indices=[0, 2])
    torch.testing.assert_close(final, ref_final, atol=1e-4, rtol=0)
    for a, b in zip(feats, ref_feats):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@torch.no_grad()
def test_timm_parity_full_width_small() -> None:
    # TNT-S at its real widths, heads and 224 px input; 2 of its 12 blocks (all 12 take ~5 s)
    ref = _perturbed("tnt_s_patch16_224", depth=2)
    ours = load_timm(medvit.create_model("tnt_s_patch16_224", depth=2), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    names = medvit.list_models("tnt_*")
    assert names == ["tnt_b_patch16_224", "tnt_s_patch16_224"]
    for name in names:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name


def test_paper_configuration() -> None:
    with torch.device("meta"):
        m = medvit.create_model("tnt_b_patch16_224")
    blk = m.blocks[0]
    assert (m.embed_dim, len(m.blocks), blk.outer.attn.num_heads) == (640, 12, 10)
    assert (blk.inner.attn.num_heads, blk.inner.norm1.normalized_shape) == (4, (40,))
    assert m.pixel_pos.shape == (1, 40, 4, 4)  # 16 px patches give 4 x 4 pixel tokens
    assert blk.proj.bias is None and blk.inner.mlp.fc1.out_features == 160


def test_pixel_embedding_sees_one_patch_at_a_time() -> None:
    m = tnt(num_classes=0, global_pool="")
    x = torch.randn(1, 3, 64, 64)
    pixels = m.pixel_embed(x, m.pixel_pos)
    assert pixels.shape == (16, 16, 8)  # 4 x 4 patches, 4 x 4 pixels each, inner_dim 8
    y = x.clone()
    y[:, :, :16, :16] += 1.0  # only the first patch changes
    changed = (m.pixel_embed(y, m.pixel_pos) - pixels).abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [True] + [False] * 15


def test_legacy_layout_is_refused(timm: ModuleType) -> None:
    ref = timm.create_model("tnt_s_legacy_patch16_224", **SMALL, num_heads_outer=4)
    with pytest.raises(ValueError, match="legacy TNT layout"):
        load_timm(tnt(), ref.state_dict())


def test_interface() -> None:
    m = tnt()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 16, 48)
    torch.testing.assert_close(m(x), m.forward_head(feats))
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])
    maps = m.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [f.shape for f in maps] == [(2, 48, 4, 4)] * 2
    normed = m.forward_intermediates(x, [-1], norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(normed[0], feats[:, 1:])
    early = m.forward_intermediates(x, [0], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], m.forward_intermediates(x, [0], intermediates_only=True)[0])
    m.reset_classifier(3, global_pool="avg")
    assert m(x).shape == (2, 3)
    m.reset_classifier(0)
    torch.testing.assert_close(m(x), feats[:, 1:].mean(dim=1))
    assert (m.num_features, m.spatial_dims, m.in_chans, m.img_size) == (48, 2, 3, (64, 64))
    assert tnt(num_classes=0)(x).shape == (2, 48)


def test_freeze_patch_embed() -> None:
    m = tnt(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in m.pixel_embed.parameters())
    m(torch.randn(1, 3, 64, 64)).sum().backward()
    assert m.pixel_pos.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("tnt_s_patch16_224", img_size=100)
    with pytest.raises(ValueError, match="global_pool"):
        tnt(global_pool="map")
    with pytest.raises(ValueError, match="must divide"):
        tnt(num_heads=5)
    with pytest.raises(ValueError, match="expected input"):
        tnt()(torch.randn(1, 3, 32, 32))
