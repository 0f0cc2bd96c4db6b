"""Vision Longformer: window mechanism, shapes, interface, paper parameter counts.

timm has no ViL, so there is no parity test; the attention is checked against plain
attention (window covering the grid) and against the window's definition.
"""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers import Attention
from medvit.layers.longformer_attention import LongformerAttention2d

SMALL = dict(
    img_size=64,
    embed_dim=(8, 16, 16, 32),
    depth=(1, 1, 2, 1),
    num_heads=(1, 2, 2, 4),
    window_size=2,
    num_classes=5,
)


def _perturb(m: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)


def _count(name: str) -> int:
    with torch.device("meta"):
        m = medvit.create_model(name)
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,paper_m", [("vil_tiny", 6.7), ("vil_small", 24.6)])
def test_parameter_count_matches_paper(name: str, paper_m: float) -> None:
    assert round(_count(name) / 1e6, 1) == paper_m


@torch.no_grad()
def test_full_window_equals_plain_attention() -> None:
    torch.manual_seed(0)
    ours = LongformerAttention2d(
        16, 2, grid_size=(3, 4), window_size=4, num_global=1, rel_pos_bias=False
    ).eval()
    ref = Attention(16, 2, qkv_bias=True).eval()
    _perturb(ours)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 13, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


@torch.no_grad()
def test_explicit_and_fused_paths_agree() -> None:
    torch.manual_seed(0)
    attn = LongformerAttention2d(16, 2, grid_size=(5, 5), window_size=1, num_global=2).eval()
    _perturb(attn)
    x = torch.randn(2, 27, 16)
    y, w = attn(x, return_attn=True)
    torch.testing.assert_close(attn(x), y, atol=1e-5, rtol=0)
    # patch token (0, 0) (index 2) sees 2 global tokens + its 2x2 corner of the grid
    assert (w[:, :, 2] > 0).sum(-1).eq(2 + 4).all()
    assert (w[:, :, 0] > 0).all()  # a global token sees everything


@torch.no_grad()
@pytest.mark.parametrize("rel_pos_bias", [False, True])
def test_patch_token_ignores_tokens_outside_its_window(rel_pos_bias: bool) -> None:
    torch.manual_seed(0)
    g, (h, w), r = 1, (6, 6), 1
    attn = LongformerAttention2d(
        8, 2, grid_size=(h, w), window_size=r, num_global=g, rel_pos_bias=rel_pos_bias
    )
    _perturb(attn.eval())
    x = torch.randn(1, g + h * w, 8)
    y = attn(x)
    moved = (4, 4)
    x2 = x.clone()
    x2[:, g + moved[0] * w + moved[1]] += 5.0
    y2 = attn(x2)
    for i in range(h):
        for j in range(w):
            changed = not torch.allclose(y[:, g + i * w + j], y2[:, g + i * w + j], atol=1e-6)
            assert changed == (abs(i - moved[0]) <= r and abs(j - moved[1]) <= r), (i, j)
    assert not torch.allclose(y[:, 0], y2[:, 0])  # the global token sees all
    # a patch token sees the global token, wherever it is
    x3 = x.clone()
    x3[:, 0] += 5.0
    assert not torch.allclose(attn(x3)[:, g], y[:, g])


@torch.no_grad()
def test_forward_intermediates_are_multiscale_maps() -> None:
    m = medvit.create_model("vil_tiny", **SMALL).eval()
    assert m.stage_channels == [8, 16, 16, 32] and m.stage_strides == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    final, feats = m.forward_intermediates(x)
    expected = [(2, c, 64 // s, 64 // s) for c, s in zip(m.stage_channels, m.stage_strides)]
    assert [tuple(f.shape) for f in feats] == expected
    torch.testing.assert_close(final, m.forward_features(x))
    nlc = m.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(nlc[0], feats[1].flatten(2).transpose(1, 2))
    early = m.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
    assert [f.shape[1] for f in early] == [16, 32]
    # the head is the mean of the last stage's normed patch tokens
    pooled = m.forward_head(final, pre_logits=True)
    torch.testing.assert_close(pooled, m.norm(feats[-1].flatten(2).transpose(1, 2)).mean(1))
    with pytest.raises(ValueError, match="output_fmt"):
        m.forward_intermediates(x, output_fmt="NHWC")


def test_interface_classifier_and_freezing() -> None:
    m = medvit.create_model("vil_small", **SMALL, freeze_patch_embed=True)
    assert not any(p.requires_grad for p in m.stages[0].patch_embed.parameters())
    assert all(p.requires_grad for p in m.stages[1].patch_embed.parameters())
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 5) and m.num_features == 32 and m.spatial_dims == 2
    m.reset_classifier(0)
    assert m(x).shape == (2, 32)
    m.reset_classifier(7)
    assert m(x).shape == (2, 7) and m.num_classes == 7
    assert medvit.create_model("vil_tiny", **{**SMALL, "num_classes": 0})(x).shape == (2, 32)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("vil_tiny", **{**SMALL, "img_size": 60})
    with pytest.raises(ValueError, match="one per stage"):
        medvit.create_model("vil_tiny", **{**SMALL, "depth": (1, 1)})
    with pytest.raises(ValueError, match="global_pool"):
        medvit.create_model("vil_tiny", **{**SMALL, "global_pool": "token"})
    m = medvit.create_model("vil_tiny", **SMALL)
    with pytest.raises(ValueError, match="input size"):
        m(torch.randn(1, 3, 32, 32))


@torch.no_grad()
def test_full_size_vil_tiny_strides_at_224() -> None:
    m = medvit.create_model("vil_tiny").eval()
    final, feats = m.forward_intermediates(torch.randn(1, 3, 224, 224))
    expected = [(48, 56, 56), (96, 28, 28), (192, 14, 14), (384, 7, 7)]
    assert [tuple(f.shape[1:]) for f in feats] == expected
    assert final.shape == (1, 49, 384)  # no global token in the full-attention last stage
    assert m.forward_head(final).shape == (1, 1000)
