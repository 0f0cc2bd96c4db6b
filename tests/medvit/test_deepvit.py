"""DeepViT: configurations, re-attention, the conv stem and the common interface.

timm has no DeepViT, so there is no parity test; re-attention is checked against plain
attention with the same weights instead.
"""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers import Attention
from medvit.layers.hybrid_embed import HybridEmbed
from medvit.layers.reattention import ReAttention

TINY = dict(embed_dim=36, depth=3, num_heads=3, reattn_depth=2, img_size=32, stem_width=8, num_classes=5)


def deepvit(**kw):
    return medvit.create_model("deepvit_small", **{**TINY, **kw}).eval()


def _count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in medvit.create_model(name).parameters())


def _official_count(dim: int, depth: int, reattn_depth: int, heads: int = 12, classes: int = 1000) -> int:
    """Parameters of the official DeepVisionTransformer (conv stem, MLP ratio 3), by hand."""
    hidden = 3 * dim
    attn = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    block = attn + (dim * hidden + hidden) + (hidden * dim + dim) + 4 * dim  # + MLP + 2 norms
    reattn = heads * heads + heads + 2 * heads  # 1x1 conv over heads + BatchNorm
    stem = 3 * 64 * 49 + 2 * 64 + 64 * 64 * 9 + 2 * 64 + (64 * dim * 8 * 8 + dim)
    tokens = dim + 197 * dim  # class token, position table
    return depth * block + reattn_depth * reattn + stem + tokens + 2 * dim + dim * classes + classes


def test_parameter_counts_are_the_official_configurations() -> None:
    # The hand counts equal the official deepvit_S / deepvit_L (zhoudaquan/dvit_repo,
    # models/deep_vision_transformer.py) instantiated: 27,312,632 and 58,883,708.
    small, large = _count("deepvit_small"), _count("deepvit_large")
    assert small == _official_count(396, 16, 5) == 27_312_632
    assert large == _official_count(420, 32, 12) == 58_883_708


def test_parameter_counts_match_the_published_table() -> None:
    # The paper's comparison with other models (Zhou et al., arXiv:2103.11886; the same figures
    # are quoted in CoAtNet's ImageNet-1K table): DeepViT-S 27M, DeepViT-L 55M, given to 1M.
    assert abs(_count("deepvit_small") / 1e6 - 27) <= 0.5
    # The paper's 55M for DeepViT-L cannot come from the official deepvit_L (width 420, 32
    # blocks, MLP ratio 3, conv stem): that one has 58.9M and is what is registered, checked
    # exactly above. Dropping any part of it (stem, head) does not reach 55M either.
    large = _count("deepvit_large")
    assert abs(large / 1e6 - 55) > 0.5 and abs(large / 1e6 - 58.9) <= 0.05


def test_re_attention_sits_in_the_top_blocks() -> None:
    with torch.device("meta"):
        small = medvit.create_model("deepvit_small")
        large = medvit.create_model("deepvit_large")
    kinds = [type(b.attn) for b in small.blocks]
    assert kinds == [Attention] * 11 + [ReAttention] * 5
    assert [type(b.attn) for b in large.blocks] == [Attention] * 20 + [ReAttention] * 12
    assert small.blocks[-1].attn.reatten_scale == pytest.approx(33**-0.5)  # 396 / 12 heads
    assert large.blocks[-1].attn.reatten_scale == 1.0
    assert small.blocks[-1].attn.reatten_matrix.weight.shape == (12, 12, 1, 1)


@torch.no_grad()
def test_identity_mixing_in_eval_is_plain_attention() -> None:
    torch.manual_seed(0)
    plain = Attention(48, num_heads=4, qkv_bias=True).eval()
    re = ReAttention(48, num_heads=4, qkv_bias=True).eval()
    re.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 10, 48)
    # the default (paper) initialisation is not the identity: the outputs differ
    assert not torch.allclose(re(x), plain(x), atol=1e-3)
    re.reatten_matrix.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
    re.reatten_matrix.bias.zero_()
    # fresh BatchNorm statistics (mean 0, var 1) in eval mode leave the maps unchanged
    torch.testing.assert_close(re(x), plain(x), atol=1e-4, rtol=0)


@torch.no_grad()
def test_mixing_matrix_mixes_heads_after_softmax() -> None:
    torch.manual_seed(0)
    plain = Attention(48, num_heads=4).eval()
    re = ReAttention(48, num_heads=4).eval()
    re.load_state_dict(plain.state_dict(), strict=False)
    perm = torch.tensor([2, 0, 3, 1])
    re.reatten_matrix.weight.copy_(torch.eye(4)[perm].view(4, 4, 1, 1))
    re.reatten_matrix.bias.zero_()
    x = torch.randn(2, 7, 48)
    _, maps = plain(x, return_attn=True)
    _, mixed = re(x, return_attn=True)
    torch.testing.assert_close(mixed, maps[:, perm], atol=1e-4, rtol=0)
    # a head mixed from two softmax maps is their weighted sum (rows then sum to the weights)
    w = torch.zeros(4, 4)
    w[0, 0], w[0, 1] = 0.3, 0.7
    re.reatten_matrix.weight.copy_(w.view(4, 4, 1, 1))
    _, mixed = re(x, return_attn=True)
    torch.testing.assert_close(mixed[:, 0], 0.3 * maps[:, 0] + 0.7 * maps[:, 1], atol=1e-4, rtol=0)


def test_batchnorm_normalises_each_head_in_training() -> None:
    torch.manual_seed(0)
    re = ReAttention(48, num_heads=4).train()
    re.var_norm.eps = 1e-12  # the softmax maps vary little; the default eps would shrink them
    _, maps = re(torch.randn(4, 9, 48), return_attn=True)
    per_head = maps.transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(per_head.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_head.var(1, unbiased=False), torch.ones(4), atol=1e-2, rtol=0)


def test_conv_stem_and_token_grid() -> None:
    m = deepvit(img_size=64)
    assert isinstance(m.patch_embed, HybridEmbed)
    assert m.patch_embed.proj.kernel_size == (8, 8) and m.patch_embed.backbone.conv1.stride == (2, 2)
    assert m.grid_size == (4, 4) and m.pos_embed.shape == (1, 17, 36)
    plain = deepvit(conv_stem=False)
    assert plain.patch_embed.proj.kernel_size == (16, 16)


def test_common_interface() -> None:
    m = deepvit()
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 5)
    final, feats = m.forward_intermediates(x, indices=[0, 2])
    assert [f.shape for f in feats] == [(2, 36, 2, 2)] * 2
    torch.testing.assert_close(final, m.forward_features(x))
    nlc = m.forward_intermediates(x, indices=1, output_fmt="NLC", intermediates_only=True)
    assert nlc[0].shape == (2, 4, 36)
    early = m.forward_intermediates(x, [1], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], m.forward_intermediates(x, [1], intermediates_only=True)[0])
    assert len(m.attention_maps(x)) == 3
    m.reset_classifier(0)
    assert m(x).shape == (2, m.num_features) == (2, 36)
    m.reset_classifier(7, global_pool="avg")
    assert m(x).shape == (2, 7)
    assert deepvit(global_pool="map", class_token=False)(x).shape == (2, 5)


def test_freeze_patch_embed_freezes_the_projection_only() -> None:
    m = deepvit(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in m.patch_embed.proj.parameters())
    assert all(p.requires_grad for p in m.patch_embed.backbone.parameters())
    m.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert m.patch_embed.proj.weight.grad is None and m.blocks[-1].attn.reatten_matrix.weight.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="reattn_depth"):
        deepvit(reattn_depth=4)
    with pytest.raises(ValueError, match="does not divide"):
        deepvit(img_size=40)
    with pytest.raises(ValueError, match="multiple of the backbone's stride"):
        deepvit(patch_size=15, img_size=30)
    with pytest.raises(ValueError, match="does not match"):
        deepvit()(torch.randn(1, 3, 48, 48))
