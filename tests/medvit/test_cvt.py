"""CvT: timm has no CvT, so behaviour, the paper's parameter counts and the interface."""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.convert import load_timm


def _count(name: str, **kw) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in medvit.create_model(name, **kw).parameters())


def test_parameter_counts_are_the_papers() -> None:
    # Table 2 of the paper: CvT-13 20M, CvT-21 32M, CvT-W24 277M (ImageNet-1k head)
    assert round(_count("cvt_13") / 1e6) == 20
    assert round(_count("cvt_21") / 1e6) == 32
    assert round(_count("cvt_w24") / 1e6) == 277


def test_paper_configuration_shapes() -> None:
    with torch.device("meta"):
        m = medvit.create_model("cvt_13")
    assert m.stage_channels == [64, 192, 384] and m.stage_strides == [4, 8, 16]
    assert [len(s.blocks) for s in m.stages] == [1, 2, 10]
    assert [s.cls_token is not None for s in m.stages] == [False, False, True]
    attn = m.stages[1].blocks[0].attn
    assert attn.conv_proj_k.conv.stride == (2, 2) and attn.conv_proj_q.conv.stride == (1, 1)
    assert attn.conv_proj_k.conv.groups == 192 and attn.scale == 192**-0.5
    assert not any("pos_embed" in n for n, _ in m.named_parameters())


def _tiny(**kw):
    args = dict(embed_dim=(16, 32, 48), depth=(1, 1, 2), num_heads=(1, 2, 3), img_size=32)
    return medvit.create_model("cvt_13", **{**args, **kw})


@torch.no_grad()
def test_forward_intermediates_stage_maps() -> None:
    m = _tiny(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    final, feats = m.forward_intermediates(x)
    assert [f.shape for f in feats] == [(2, 16, 8, 8), (2, 32, 4, 4), (2, 48, 2, 2)]
    torch.testing.assert_close(final, m.forward_features(x))
    assert final.shape == (2, 1 + 4, 48)
    nlc = m.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True, intermediates_only=True)
    torch.testing.assert_close(nlc[0], final[:, 1:])
    early = m.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], feats[0])
    # the head reads the normalised class token
    torch.testing.assert_close(m(x), m.head(final[:, 0]))


@torch.no_grad()
def test_conv_projection_downsamples_keys_only() -> None:
    m = _tiny().eval()
    attn = m.stages[0].blocks[0].attn
    tokens, grid = m.stages[0].patch_embed(torch.randn(1, 3, 32, 32))
    grid_map = tokens.transpose(1, 2).reshape(1, 16, *grid)
    assert attn.conv_proj_k(grid_map).shape[2:] == (4, 4) and attn.conv_proj_q(grid_map).shape[2:] == (8, 8)
    assert attn(tokens, grid).shape == tokens.shape


@torch.no_grad()
def test_conv_projection_attention_matches_explicit_computation() -> None:
    """The last stage's attention against a hand-written CvT attention (class token
    bypassing the depthwise conv + BN, stride-2 keys/values, scale by the full width)."""
    import torch.nn.functional as F

    m = _tiny().eval()
    attn = m.stages[2].blocks[0].attn
    for bn in (attn.conv_proj_q.bn, attn.conv_proj_k.bn, attn.conv_proj_v.bn):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 1 + 16, 48)
    cls, grid_map = x[:, :1], x[:, 1:].transpose(1, 2).reshape(2, 48, 4, 4)

    def branch(seq, lin, stride):
        y = F.conv2d(grid_map, seq.conv.weight, stride=stride, padding=1, groups=48)
        y = F.batch_norm(y, seq.bn.running_mean, seq.bn.running_var, seq.bn.weight, seq.bn.bias, eps=seq.bn.eps)
        y = lin(torch.cat([cls, y.flatten(2).transpose(1, 2)], 1))
        return y.reshape(2, y.shape[1], 3, 16).transpose(1, 2)

    q = branch(attn.conv_proj_q, attn.proj_q, 1)
    k = branch(attn.conv_proj_k, attn.proj_k, 2)
    v = branch(attn.conv_proj_v, attn.proj_v, 2)
    assert k.shape[2] == 1 + 4
    ref = F.scaled_dot_product_attention(q, k, v, scale=48**-0.5).transpose(1, 2).reshape(2, 17, 48)
    torch.testing.assert_close(attn(x, (4, 4)), attn.proj(ref), atol=1e-5, rtol=0)


@torch.no_grad()
def test_3d_variant_multiscale_features() -> None:
    m = medvit.create_model("cvt_13_3d", embed_dim=(8, 16, 16), depth=(1, 1, 1), num_heads=(1, 2, 2), img_size=32).eval()
    assert m.spatial_dims == 3 and m.img_size == (32, 32, 32) and m.in_chans == 1
    x = torch.randn(1, 1, 32, 32, 32)
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [f.shape for f in feats] == [(1, 8, 8, 8, 8), (1, 16, 4, 4, 4), (1, 16, 2, 2, 2)]
    assert m(x).shape == (1, 16)


def test_heads_freeze_and_training() -> None:
    m = _tiny(num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 4)
    m.reset_classifier(7, global_pool="avg")
    assert m(x).shape == (2, 7) and m.num_classes == 7
    m.reset_classifier(0, global_pool="")
    assert m(x).shape == (2, 5, 48)
    assert _tiny(num_classes=0)(x).shape == (2, 48) and m.num_features == 48
    frozen = _tiny(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in frozen.stages[0].patch_embed.parameters())
    assert all(p.requires_grad for p in frozen.stages[0].blocks.parameters())
    frozen(x).sum().backward()
    assert frozen.stages[0].patch_embed.proj.weight.grad is None
    assert frozen.stages[0].blocks[0].attn.conv_proj_q.conv.weight.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("cvt_13", img_size=100)
    with pytest.raises(ValueError, match="one entry per stage"):
        medvit.create_model("cvt_13", depth=(1, 2))
    with pytest.raises(ValueError, match="global_pool"):
        medvit.create_model("cvt_13", global_pool="map")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        _tiny(num_heads=(3, 2, 3))
    with pytest.raises(ValueError, match="expected a 4-D input"):
        _tiny()(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match="does not know how to load"):
        load_timm(_tiny(), {})
