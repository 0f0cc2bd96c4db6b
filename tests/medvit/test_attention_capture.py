"""`capture_attention`: every attention family records its weights through one mechanism."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_configs import tiny_overrides

import medvit
from medvit.analysis import mean_attention_distance
from medvit.layers import Attention
from medvit.layers.attention_capture import (
    attend,
    capture_attention,
    capturing,
)
from medvit.registry import catalog

ALL = medvit.list_models()
# families (module names) without attention: they must record nothing
NO_ATTENTION = {"convmixer", "mixer", "unet"}
# families whose records have no token positions, so no attention distance:
# HVT pools its tokens in 1D (no grid); XCiT attends across channels, and its class
# attention's query is the class token
NO_POSITIONS = {"hvt", "xcit"}


def _family(name: str) -> str:
    return catalog()[name].rsplit(".", 1)[1]


def _input_for(model: torch.nn.Module) -> torch.Tensor:
    frames = getattr(model, "num_frames", None)
    return torch.randn(1, model.in_chans, *((frames,) if frames else ()), *tuple(model.img_size))


def test_the_family_lists_name_registered_families() -> None:
    families = {_family(n) for n in ALL}
    assert NO_ATTENTION <= families and NO_POSITIONS <= families


@pytest.mark.parametrize("name", ALL)
def test_every_variant_records_its_attention(name: str) -> None:
    torch.manual_seed(0)
    model = medvit.create_model(name, **tiny_overrides(name)).eval()
    x = _input_for(model)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model) as records:
            captured = model(x)
    # the explicit path computes what the fused kernels do
    torch.testing.assert_close(captured, plain, atol=1e-4, rtol=1e-4)
    family = _family(name)
    if family in NO_ATTENTION:
        assert records == [], f"{family} has attention now: add it to the covered families"
        return
    assert records, f"{name}: no attention recorded"
    for rec in records:
        assert rec.probs.ndim == 4 and (rec.probs >= 0).all()
        torch.testing.assert_close(rec.probs.sum(-1), torch.ones(rec.probs.shape[:-1]), atol=1e-5, rtol=0)
    located = [r for r in records if r.located]
    if family in NO_POSITIONS:
        assert not located
        return
    assert located, f"{name}: no record has token positions"
    diagonal = math.dist([0.0] * (x.ndim - 2), x.shape[2:])
    for rec in located:
        d = mean_attention_distance(rec)
        assert d.shape == (rec.probs.shape[1],)
        assert ((d >= 0) & (d <= diagonal)).all(), (rec.name, d)
        if math.prod(rec.key_grid) > 1:  # softmax weights are never exactly 0 on the other keys
            assert (d > 0).all(), (rec.name, d)


def test_capture_equals_softmax_of_q_k_by_hand() -> None:
    torch.manual_seed(0)
    model = medvit.create_model("vit_tiny_patch16_224", **tiny_overrides("vit_tiny_patch16_224")).eval()
    x = torch.randn(1, 3, 32, 32)
    tokens, _ = model.embed(x)
    blk = model.blocks[0]
    heads, n = blk.attn.num_heads, tokens.shape[1]
    d = blk.attn.head_dim
    q, k, _ = blk.attn.qkv(blk.norm1(tokens)).reshape(1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    expected = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1)
    with torch.no_grad(), capture_attention(model) as records:
        model(x)
    rec = records[0]
    assert rec.name == "blocks.0.attn"
    torch.testing.assert_close(rec.probs, expected.detach(), atol=1e-5, rtol=0)
    # a 32 px image in 16 px patches behind a class token
    assert (rec.query_prefix, rec.query_grid, rec.query_stride) == (1, (2, 2), (16.0, 16.0))
    assert model.attention_maps(x)[0].shape == (1, heads, n, n)


def test_the_capture_ends_with_its_block() -> None:
    layer = Attention(8, num_heads=2)
    with capture_attention(layer) as records:
        assert capturing()
        layer(torch.randn(2, 5, 8))
    assert not capturing() and len(records) == 1 and records[0].probs.shape == (2, 2, 5, 5)
    layer(torch.randn(2, 5, 8))
    assert len(records) == 1
    # attend with a mask: the masked key gets no weight, outside a capture it is the fused kernel
    q, k, v = torch.randn(3, 1, 1, 3, 4).unbind(0)
    mask = torch.tensor([[0.0, 0.0, float("-inf")]])
    with capture_attention(layer) as records:
        y = attend(layer, q, k, v, attn_mask=mask)
    assert records[0].probs[..., 2].abs().max() == 0
    torch.testing.assert_close(y, attend(layer, q, k, v, attn_mask=mask))


def test_swin_windows_are_located_on_the_whole_grid() -> None:
    name = "swin_tiny_patch4_window7_224"
    model = medvit.create_model(name, **tiny_overrides(name)).eval()
    with torch.no_grad(), capture_attention(model) as records:
        model(_input_for(model))
    first = records[0]
    win = model.layers[0].blocks[0].attn.window_size if hasattr(model, "layers") else first.query_grid
    assert first.query_grid == tuple(win) and first.tiled_grid is not None
    # stage 1 tokens are 4 px patches, whatever the window
    assert first.query_stride == pytest.approx((4.0,) * len(first.query_grid))


def test_spatial_reduction_keys_lie_on_the_coarser_grid() -> None:
    model = medvit.create_model("pvt_tiny", **tiny_overrides("pvt_tiny")).eval()
    with torch.no_grad(), capture_attention(model) as records:
        model(_input_for(model))
    reduced = [r for r in records if r.key_grid != r.query_grid]
    assert reduced, "the tiny PVT has no spatial reduction"
    for r in reduced:
        ratio = [q / k for q, k in zip(r.query_grid, r.key_grid)]
        assert list(r.key_stride) == pytest.approx([s * f for s, f in zip(r.query_stride, ratio)])


def test_divided_space_time_attention_is_split_by_axes() -> None:
    name = "timesformer_base"
    model = medvit.create_model(name, **tiny_overrides(name)).eval()
    x = _input_for(model)
    with torch.no_grad(), capture_attention(model) as records:
        model(x)
    axes = {r.axes for r in records}
    assert axes == {(0,), (1, 2)}  # time at one location; space within a frame
    time = next(r for r in records if r.axes == (0,))
    assert time.query_grid == (x.shape[2],) and time.query_prefix == 0


def test_medt_local_patches_keep_the_global_pixel_scale() -> None:
    model = medvit.create_model("medt", **tiny_overrides("medt")).eval()
    with torch.no_grad(), capture_attention(model) as records:
        model(_input_for(model))
    by_name = {r.name: r for r in records}
    glob, local = by_name["global_branch.stages.0.0.attn_h"], by_name["local_branch.stages.0.0.attn_h"]
    # the local branch attends along a column of one patch: its tokens are as large as the
    # global branch's at the same depth, and the patches tile the image
    assert local.query_stride == glob.query_stride and local.axes == (0,)
    assert local.tiled_grid[0] * local.query_stride[0] == model.img_size[0]
    # near-even attention over half the length: about half the distance (n/3 tokens apart on average)
    n_local, n_global = local.query_grid[0], glob.query_grid[0]
    for rec, n in ((local, n_local), (glob, n_global)):
        even = (n * n - 1) / (3 * n) * rec.query_stride[0]
        assert mean_attention_distance(rec).tolist() == pytest.approx([even] * rec.probs.shape[1], rel=0.1)
