"""HVT: parity of the ViT parts with timm, token pooling, interface, parameter counts.

timm has no HVT; the reference is timm's ViT (no class token, GAP head) with the same
weights, run through the paper's pooling schedule by hand (torch max_pool1d between
timm's blocks and the stage position tables).
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import medvit
from medvit.layers.token_pool import TokenMaxPool1d


SMALL = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5)


def _perturb(m: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def _timm_reference(ref: torch.nn.Module, ours: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = ref.norm_pre(ref._pos_embed(ref.patch_embed(x)))
    for i, pos in enumerate(ours.stage_pos_embed):
        t = F.max_pool1d(t.transpose(1, 2), 3, 2).transpose(1, 2) + pos
        for blk in ref.blocks[i * ours.stage_depth : (i + 1) * ours.stage_depth]:
            t = blk(t)
    return ref.forward_head(ref.norm(t))


@torch.no_grad()
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_parity_with_timm_vit_blocks(stages: int, timm: ModuleType) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(
        "vit_tiny_patch16_224", class_token=False, global_pool="avg", num_classes=5,
        img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2,
    ).eval()
    _perturb(ref)
    ours = medvit.create_model("hvt_ti_1", **SMALL, num_pool_stages=stages).eval()
    _perturb(ours)
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert unexpected == [] and sorted(missing) == [f"stage_pos_embed.{i}" for i in range(stages)]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), _timm_reference(ref, ours, x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_full_size_parity_hvt_ti_1(timm: ModuleType) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(
        "deit_tiny_patch16_224", class_token=False, global_pool="avg", num_classes=10
    ).eval()
    _perturb(ref)
    ours = medvit.create_model("hvt_ti_1", num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), _timm_reference(ref, ours, x), atol=1e-4, rtol=0)


def test_parameter_counts(timm: ModuleType) -> None:
    for name, base, d in (
        ("hvt_ti_1", "deit_tiny_patch16_224", 192),
        ("hvt_s_1", "deit_small_patch16_224", 384),
        ("hvt_ti_4", "deit_tiny_patch16_224", 192),
        ("hvt_s_4", "deit_small_patch16_224", 384),
    ):
        with torch.device("meta"):
            ours = medvit.create_model(name)
            ref = timm.create_model(base, class_token=False, global_pool="avg")
        n = sum(p.numel() for p in ours.parameters())
        # the same ViT plus one position table per pooled stage
        assert n == sum(p.numel() for p in ref.parameters()) + sum(ours.stage_lengths) * d, name
    with torch.device("meta"):
        hvt_s_1 = medvit.create_model("hvt_s_1")
    assert round(sum(p.numel() for p in hvt_s_1.parameters()) / 1e6, 2) == 22.09


def test_token_pool() -> None:
    pool = TokenMaxPool1d(3, 2)
    x = torch.randn(2, 9, 4)
    y = pool(x)
    assert y.shape == (2, pool.out_len(9), 4) == (2, 4, 4)
    torch.testing.assert_close(y[:, 1], x[:, 2:5].amax(1))
    with pytest.raises(ValueError, match="invalid token pooling"):
        TokenMaxPool1d(3, 0)


@torch.no_grad()
def test_forward_intermediates_are_pooled_sequences() -> None:
    m = medvit.create_model("hvt_s_4", **{**SMALL, "num_pool_stages": 2}).eval()
    x = torch.randn(2, 3, 32, 32)
    final, feats = m.forward_intermediates(x)
    assert m.stage_lengths == [31, 15] and [tuple(f.shape) for f in feats] == [(2, 31, 32), (2, 15, 32)]
    assert m.stage_channels == [32, 32] and m.stage_strides == [32, 64]
    torch.testing.assert_close(final, m.forward_features(x))
    torch.testing.assert_close(m.norm(feats[-1]), final)
    only = m.forward_intermediates(x, indices=[0], norm=True, intermediates_only=True, stop_early=True)
    torch.testing.assert_close(only[0], m.norm(feats[0]))
    with pytest.raises(ValueError, match="no grid"):
        m.forward_intermediates(x, output_fmt="NCHW")
    assert [a.shape[-1] for a in m.attention_maps(x)] == [31, 31, 15, 15]


def test_interface_classifier_and_freezing() -> None:
    m = medvit.create_model("hvt_ti_4", **{**SMALL, "num_pool_stages": 4}, freeze_patch_embed=True)
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 5) and m.num_features == 32 and m.spatial_dims == 2
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)
    m.reset_classifier(3, global_pool="avg")
    assert m(x).shape == (2, 3) and m.num_classes == 3
    assert medvit.create_model("hvt_s_1", **{**SMALL, "num_classes": 0})(x).shape == (2, 32)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="must be >= 1 and divide depth"):
        medvit.create_model("hvt_s_1", **{**SMALL, "num_pool_stages": 3})
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("hvt_s_1", **{**SMALL, "img_size": 30})
    with pytest.raises(ValueError, match="no tokens"):
        medvit.create_model("hvt_s_1", **{**SMALL, "img_size": 8, "depth": 4, "num_pool_stages": 4})
    with pytest.raises(ValueError, match="class_token"):
        medvit.create_model("hvt_s_1", **SMALL, class_token=True)
    with pytest.raises(ValueError, match="global_pool"):
        medvit.create_model("hvt_s_1", **SMALL, global_pool="token")
