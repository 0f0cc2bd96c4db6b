"""The shared building blocks."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
import torch.nn.functional as F

from medvit.layers import (
    Attention,
    AttentionPoolLatent,
    Block,
    ConvBlock,
    DropPath,
    LayerScale,
    Mlp,
    PatchEmbed,
    drop_path_schedule,
    pool_tokens,
    resample_pos_embed,
    sincos_pos_embed,
)

from helpers import require


@pytest.mark.parametrize(
    "spatial_dims,size,patch,grid",
    [(2, 32, 8, (4, 4)), (3, 16, 8, (2, 2, 2)), (3, (8, 32, 32), (2, 16, 16), (4, 2, 2))],
)
def test_patch_embed_shapes(spatial_dims, size, patch, grid) -> None:
    pe = PatchEmbed(spatial_dims, size, patch, in_chans=2, embed_dim=24)
    shape = (size,) * spatial_dims if isinstance(size, int) else size
    out = pe(torch.randn(3, 2, *shape))
    assert pe.grid_size == grid
    assert out.shape == (3, pe.num_patches, 24)


def test_patch_embed_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        PatchEmbed(2, 30, 16)
    pe = PatchEmbed(2, 32, 16)
    with pytest.raises(ValueError, match="does not match"):
        pe(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="expected a 4D input"):
        pe(torch.randn(1, 3, 32, 32, 32))


def test_attention_fused_equals_explicit_and_weights_are_distributions() -> None:
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 10, 32)
    fused = attn(x)
    explicit, weights = attn(x, return_attn=True)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 4, 10, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))


def test_attention_matches_torch_multihead_attention() -> None:
    ours = Attention(16, num_heads=2, qkv_bias=True).eval()
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    ref.in_proj_weight.data.copy_(ours.qkv.weight)
    ref.in_proj_bias.data.copy_(ours.qkv.bias)
    ref.out_proj.load_state_dict(ours.proj.state_dict())
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="must divide"):
        Attention(30, num_heads=4)


def test_drop_path_schedule_and_behaviour() -> None:
    assert drop_path_schedule(0.2, 5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    assert drop_path_schedule(0.1, 1) == [0.0]
    dp = DropPath(0.5)
    x = torch.ones(1000, 4)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    y = dp(x)
    kept = (y[:, 0] != 0).float().mean().item()
    assert 0.4 < kept < 0.6
    assert set(torch.unique(y).tolist()) <= {0.0, 2.0}
    with pytest.raises(ValueError):
        drop_path_schedule(1.5, 3)


def test_layer_scale_and_block_swaps_parts() -> None:
    ls = LayerScale(8, init_values=0.1)
    torch.testing.assert_close(ls(torch.ones(2, 8)), torch.full((2, 8), 0.1))

    class TwoLayerMlp(Mlp):
        pass

    blk = Block(16, 2, init_values=1e-5, mlp_layer=TwoLayerMlp)
    assert isinstance(blk.mlp, TwoLayerMlp)
    x = torch.randn(2, 5, 16)
    # LayerScale near zero: the block is almost the identity at initialisation
    assert (blk(x) - x).abs().max() < 1e-3
    y, attn = blk(x, return_attn=True)
    assert attn.shape == (2, 2, 5, 5) and y.shape == x.shape


def test_sincos_tables() -> None:
    t2 = sincos_pos_embed((4, 6), 32)
    assert t2.shape == (24, 32)
    assert len({tuple(r.tolist()) for r in t2}) == 24  # every position distinct
    t3 = sincos_pos_embed((2, 3, 4), 30)  # 30 is not divisible by 6*... padded
    assert t3.shape == (24, 30)
    # first axis' first frequency: sin(i) for the row of position (i, 0, 0)
    torch.testing.assert_close(t3[::12, 0], torch.sin(torch.tensor([0.0, 1.0])))


def test_resample_pos_embed_matches_timm_in_2d() -> None:
    timm_pe = require("timm.layers")
    pe = torch.randn(1, 1 + 14 * 14, 64)
    ours = resample_pos_embed(pe, (24, 24), (14, 14), num_prefix_tokens=1)
    ref = timm_pe.resample_abs_pos_embed(pe, (24, 24), (14, 14), num_prefix_tokens=1)
    torch.testing.assert_close(ours, ref)
    assert torch.equal(resample_pos_embed(pe, (14, 14), (14, 14), 1), pe)


def test_resample_pos_embed_3d_keeps_a_linear_ramp() -> None:
    grid = torch.stack(torch.meshgrid(*[torch.arange(4.0)] * 3, indexing="ij"), -1).reshape(1, 64, 3)
    out = resample_pos_embed(grid, (8, 8, 8), (4, 4, 4))
    assert out.shape == (1, 512, 3)
    vol = out.reshape(8, 8, 8, 3)
    # trilinear (align_corners=False) on a ramp stays monotone along its own axis
    assert torch.all(vol[1:, :, :, 0] >= vol[:-1, :, :, 0] - 1e-6)
    with pytest.raises(ValueError, match="expected"):
        resample_pos_embed(grid, (8, 8, 8), (5, 5, 5))


def test_pooling_heads() -> None:
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(pool_tokens(x, "token", 1), x[:, 0])
    torch.testing.assert_close(pool_tokens(x, "avg", 1), x[:, 1:].mean(1))
    map_head = AttentionPoolLatent(8, num_heads=2)
    assert map_head(x).shape == (2, 8)
    # attention pooling is permutation invariant over tokens
    perm = x[:, torch.randperm(5)]
    torch.testing.assert_close(map_head(perm), map_head(x), atol=1e-5, rtol=1e-5)


def test_conv_block_residual_and_shapes() -> None:
    blk = ConvBlock(3, 2, 4)
    assert blk(torch.randn(1, 2, 6, 6, 6)).shape == (1, 4, 6, 6, 6)
    plain = ConvBlock(2, 4, 4, residual=False, norm="batch")
    assert plain.shortcut is None
    out = plain(torch.randn(2, 4, 5, 5))
    assert out.min() >= -0.01 * out.abs().max()  # ends in LeakyReLU
    with pytest.raises(ValueError, match="norm"):
        ConvBlock(3, 2, 4, norm="layer")


def test_mlp_is_two_linears() -> None:
    mlp = Mlp(6, 12).eval()
    x = torch.randn(3, 6)
    ref = F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
    torch.testing.assert_close(mlp(x), ref)


def test_instance_norm_equals_torch_and_keeps_channels_last() -> None:
    from medvit.layers.conv_blocks import InstanceNorm

    x = (torch.randn(2, 5, 6, 7, 8) * 4 + 30).contiguous(memory_format=torch.channels_last_3d)
    y = InstanceNorm(5)(x)
    torch.testing.assert_close(y, torch.nn.InstanceNorm3d(5)(x.contiguous()), atol=2e-5, rtol=0)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)
    xb = x.bfloat16()
    yb = InstanceNorm(5)(xb)
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - torch.nn.InstanceNorm3d(5)(xb.float())).abs().max() < 0.05
    torch.testing.assert_close(InstanceNorm(5)(x[..., 0]), torch.nn.InstanceNorm2d(5)(x[..., 0]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_trains_in_bf16_like_torch_and_keeps_the_layout(dims: int) -> None:
    """The bf16 training path (a channels-first copy, for GroupNorm's fast backward) gives
    torch's values and gradients, and hands back the layout it was given."""
    from medvit.layers.conv_blocks import InstanceNorm

    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    x = (torch.randn(2, 5, 6, 7, 8)[..., : 8 if dims == 3 else 1].squeeze(-1) * 4 + 30).bfloat16()
    dy = torch.randn(x.shape)
    ref_in = x.float().requires_grad_()
    ref = (torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d)(5)(ref_in)
    ref.backward(dy)
    for layout in (fmt, torch.contiguous_format):
        xi = x.contiguous(memory_format=layout).requires_grad_()
        y = InstanceNorm(5)(xi)
        assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=layout)
        y.backward(dy.bfloat16().contiguous(memory_format=layout))
        assert (y.float() - ref).abs().max() < 0.05
        assert (xi.grad.float() - ref_in.grad).abs().max() < 0.05 * ref_in.grad.abs().max()


@torch.no_grad()
def test_pointwise_conv_equals_conv_and_keeps_channels_last() -> None:
    from medvit.layers.conv_blocks import PointwiseConv

    pw = PointwiseConv(3, 6, 4)
    conv = torch.nn.Conv3d(6, 4, 1)
    conv.weight.copy_(pw.weight)
    conv.bias.copy_(pw.bias)
    x = torch.randn(2, 6, 5, 4, 3)
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(pw(x), conv(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(pw(cl), conv(x), atol=1e-6, rtol=0)
    assert pw(cl).is_contiguous(memory_format=torch.channels_last_3d)


def _callables_of(package: str) -> list[tuple[str, object]]:
    """Every class and function defined in the modules of `package`."""
    found = []
    for mod in pkgutil.walk_packages(importlib.import_module(package).__path__, f"{package}."):
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == mod.name:
                found.append((f"{mod.name}.{name}", obj))
    return found


def _params(obj: object) -> list[inspect.Parameter]:
    params = list(inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters.values())
    return params[1:] if inspect.isclass(obj) else params


def test_layers_take_spatial_dims_first_and_required() -> None:
    """The rule of `medvit.layers.helpers`: as MONAI's blocks, `spatial_dims` leads and has no default."""
    takers = [(name, _params(obj)) for name, obj in _callables_of("medvit.layers")]
    takers = [(name, ps) for name, ps in takers if any(p.name == "spatial_dims" for p in ps)]
    assert len(takers) > 15  # the scan found the layers
    wrong = [name for name, ps in takers if ps[0].name != "spatial_dims" or ps[0].default is not ps[0].empty]
    assert wrong == []


def test_spatial_dims_has_one_name() -> None:
    odd = {"dims", "ndim", "ndims", "spatial_dim", "n_dims", "num_dims"}
    found = [
        name
        for package in ("medvit.layers", "medvit.models")
        for name, obj in _callables_of(package)
        if inspect.isclass(obj) or inspect.isfunction(obj)
        for p in _params(obj)
        if p.name in odd
    ]
    assert found == []
