"""Swin Transformer: timm parity (2D), 3D windows and merging, the common interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm
from medvit.layers.window_attention import (
    PatchMerging,
    border_window_masks,
    relative_position_index,
    window_partition,
    window_reverse,
)

from helpers import require


NAMES_2D = [
    "swin_tiny_patch4_window7_224",
    "swin_small_patch4_window7_224",
    "swin_base_patch4_window7_224",
]


def _perturbed(ref: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref.eval()


def test_parameter_counts_match_timm(timm: ModuleType) -> None:
    for name in NAMES_2D:
        with torch.device("meta"):
            ours = medvit.create_model(name, num_classes=1000)
            ref = timm.create_model(name, num_classes=1000)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()), name


@torch.no_grad()
@pytest.mark.parametrize(
    "cfg",
    [
        # 56 -> grids 14, 7 (window shrinks to the grid, no shift), 4, 2
        dict(img_size=56, window_size=7),
        # non-square: the third stage shifts along one axis only
        dict(img_size=(64, 128), window_size=4),
    ],
)
def test_timm_parity_small(cfg: dict, timm: ModuleType) -> None:
    torch.manual_seed(0)
    small = dict(embed_dim=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=7, **cfg)
    ref = _perturbed(timm.create_model("swin_tiny_patch4_window7_224", **small))
    ours = medvit.create_model(
        "swin_tiny_patch4_window7_224",
        **{("depth" if k == "depths" else k): v for k, v in small.items()},
    )
    load_timm(ours, ref.state_dict()).eval()
    x = torch.randn(2, 3, *ours.img_size)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    mine = ours.forward_intermediates(x, intermediates_only=True)
    theirs = ref.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_timm_parity_full_size_tiny(timm: ModuleType) -> None:
    torch.manual_seed(0)
    name = "swin_tiny_patch4_window7_224"
    ref = _perturbed(timm.create_model(name))
    ours = load_timm(medvit.create_model(name), ref.state_dict()).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_load_timm_ignore_head_and_strictness(timm: ModuleType) -> None:
    small = dict(img_size=56, embed_dim=24, num_heads=(1, 2, 2, 4))
    ref = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), num_classes=5, **small)
    ours = medvit.create_model("swin_tiny_patch4_window7_224", depth=(1, 1, 1, 1), num_classes=3, **small)
    load_timm(ours, ref.state_dict(), ignore_head=True)
    assert ours.head.weight.shape == (3, 192)
    # older timm versions saved the derived buffers; they are recomputed, not loaded
    legacy = {**ref.state_dict(), "layers.0.blocks.0.attn.relative_position_index": torch.zeros(49, 49)}
    legacy["layers.0.blocks.0.attn_mask"] = torch.zeros(4, 49, 49)
    ours.reset_classifier(5)
    load_timm(ours, legacy)
    torch.testing.assert_close(ours.head.weight, ref.head.fc.weight)
    deeper = medvit.create_model("swin_tiny_patch4_window7_224", depth=(1, 1, 2, 1), num_classes=5, **small)
    with pytest.raises(ValueError, match="missing layers.2.blocks.1"):
        load_timm(deeper, ref.state_dict())


def _tiny(**kw: object) -> torch.nn.Module:
    cfg = dict(img_size=64, embed_dim=16, depth=(2, 2, 1, 1), num_heads=(1, 2, 2, 2), window_size=4)
    return medvit.create_model("swin_tiny_patch4_window7_224", **{**cfg, **kw})


@torch.no_grad()
def test_forward_intermediates_2d() -> None:
    model = _tiny(num_classes=4).eval()
    assert model.stage_channels == [16, 32, 64, 128] and model.stage_strides == [4, 8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    final, feats = model.forward_intermediates(x)
    expected = [(2, c, 64 // s, 64 // s) for c, s in zip([16, 32, 64, 128], [4, 8, 16, 32])]
    assert [f.shape for f in feats] == expected
    torch.testing.assert_close(final, model.forward_features(x))
    assert final.shape == (2, 2, 2, 128)  # channels-last, as forward_head expects
    nlc = model.forward_intermediates(
        x, indices=[0, -1], output_fmt="NLC", norm=True, intermediates_only=True
    )
    assert [f.shape for f in nlc] == [(2, 256, 16), (2, 4, 128)]
    torch.testing.assert_close(nlc[1], final.flatten(1, 2))
    last, early = model.forward_intermediates(x, indices=1, stop_early=True)
    assert len(early) == 1 and early[0].shape == (2, 128, 2, 2)
    part, feats = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert part.shape == (2, 8, 8, 32) and feats[0].shape == (2, 32, 8, 8)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_classifier_reset_and_pooled_features() -> None:
    model = _tiny(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 4)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == (2, 128) == (2, model.num_features)
    torch.testing.assert_close(model(x), pooled)
    model.reset_classifier(9, global_pool="")
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 2, 2, 128)
    assert _tiny(num_classes=0)(x).shape == (2, 128)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")


def test_freeze_patch_embed() -> None:
    model = _tiny(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert all(p.requires_grad for p in model.layers.parameters())
    assert all(p.requires_grad for p in _tiny().patch_embed.parameters())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        _tiny(img_size=66)
    with pytest.raises(ValueError, match="one positive entry per stage"):
        _tiny(depth=(2, 2, 2), num_heads=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="must divide"):
        _tiny(num_heads=(3, 2, 2, 2))
    with pytest.raises(ValueError, match="global_pool"):
        _tiny(global_pool="token")
    with pytest.raises(ValueError, match="does not divide the input size"):
        _tiny()(torch.randn(1, 3, 62, 64))


def test_window_helpers_3d() -> None:
    x = torch.randn(2, 6, 4, 8, 5)
    w = window_partition(x, (3, 2, 4))
    assert w.shape == (2 * 2 * 2 * 2, 24, 5)
    torch.testing.assert_close(window_reverse(w, (3, 2, 4), (6, 4, 8)), x)
    # the first window holds the corner block, row-major
    torch.testing.assert_close(w[0], x[0, :3, :2, :4].reshape(24, 5))
    idx = relative_position_index((2, 3, 4))
    assert idx.shape == (24, 24) and idx.min() == 0 and idx.max() == 3 * 5 * 7 - 1
    assert idx.unique().numel() == 3 * 5 * 7
    assert (idx.diagonal() == idx[0, 0]).all()
    mixed, mask = border_window_masks((6, 6, 6), (3, 3, 3), (1, 1, 1))
    # every window but the first straddles the roll in at least one axis
    assert mixed.tolist() == list(range(1, 8)) and mask.shape == (7, 27, 27)
    # the last window straddles it in every axis: 8 regions of sizes 8,4,4,4,2,2,2,1
    assert (mask[-1] == 0).sum() == 8 * 8 + 3 * 4 * 4 + 3 * 2 * 2 + 1
    mixed, mask = border_window_masks((9, 6), (3, 3), (1, 0))  # shifted along the first axis only
    assert mixed.tolist() == [4, 5] and (mask[0] == 0).sum() == 6 * 6 + 3 * 3


def test_patch_merging_3d_neighbours() -> None:
    merge = PatchMerging(3, 2, 3)
    assert merge.reduction.in_features == 16
    x = torch.randn(1, 4, 4, 4, 2)
    with torch.no_grad():
        merge.norm.weight.fill_(1.0)
        merge.norm.bias.zero_()
        cat = torch.cat([x[:, i::2, j::2, k::2] for k in range(2) for j in range(2) for i in range(2)], -1)
        ref = merge.reduction(torch.nn.functional.layer_norm(cat, (16,)))
        torch.testing.assert_close(merge(x), ref)
    assert merge(torch.randn(2, 5, 3, 4, 2)).shape == (2, 3, 2, 2, 3)  # odd sizes are padded


def test_3d_multiscale_features_window7_padding() -> None:
    model = medvit.create_model(
        "swin_tiny_patch4_window7_3d",
        img_size=64,
        embed_dim=12,
        depth=(2, 2, 2, 2),
        num_heads=(1, 1, 2, 2),
    )
    assert model.spatial_dims == 3 and model.stage_strides == [4, 8, 16, 32]
    # windows stay 7 while the grid is larger (16, 8: padded to 21, 14), then shrink to it
    assert [s.window_size for s in model.layers] == [(7, 7, 7)] * 2 + [(4, 4, 4), (2, 2, 2)]
    assert model.layers[0].blocks[0].attn.relative_position_bias_table.shape == (13**3, 1)
    assert model.layers[1].downsample.reduction.weight.shape == (24, 8 * 12)
    x = torch.randn(2, 1, 64, 64, 64)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in feats] == [
        (2, 12, 16, 16, 16),
        (2, 24, 8, 8, 8),
        (2, 48, 4, 4, 4),
        (2, 96, 2, 2, 2),
    ]
    assert model(x).shape == (2, 96)
    feats[1].mean().backward()
    assert model.layers[0].blocks[1].attn.relative_position_bias_table.grad.abs().sum() > 0


def _from_monai_swin(sd: dict[str, torch.Tensor], num_stages: int) -> dict[str, torch.Tensor]:
    """MONAI SwinTransformer (`mergingv2`) keys -> ours; a medvit/convert/monai.py mapper would do this.

    MONAI merges at the end of stage i, we at the start of stage i + 1, and it concatenates
    the 2 x 2 x 2 neighbours with the depth offset varying slowest, we with the width offset.
    """
    # our neighbour slot k*4 + j*2 + i holds MONAI's slot i*4 + j*2 + k: reverse the 3 bits
    order = [int(f"{m:03b}"[::-1], 2) for m in range(8)]
    out = {}
    for k, v in sd.items():
        if k.endswith("relative_position_index") or k.startswith(f"layers{num_stages + 1}."):
            continue
        stage, rest = k.split(".0.", 1) if k.startswith("layers") else (None, k)
        if stage is not None:
            i = int(stage[len("layers") :]) - 1
            if rest.startswith("downsample."):
                if i + 1 >= num_stages:
                    continue
                c = v.shape[-1] // 8
                v = v.reshape(*v.shape[:-1], 8, c)[..., order, :].flatten(-2)
                k = f"layers.{i + 1}.{rest}"
            else:
                k = f"layers.{i}.{rest}".replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")
        out[k] = v
    return out


@torch.no_grad()
def test_3d_parity_with_monai_swin_transformer() -> None:
    swin_unetr = require("monai.networks.nets.swin_unetr")
    torch.manual_seed(0)
    ref = swin_unetr.SwinTransformer(
        in_chans=1, embed_dim=12, window_size=(3, 3, 3), patch_size=(2, 2, 2), depths=(2, 2, 2, 2),
        num_heads=(1, 1, 2, 2), downsample="mergingv2", patch_norm=True, spatial_dims=3,
    )
    _perturbed(ref)
    # Where a grid is smaller than the window, MONAI keeps the full-window table and indexes
    # it with the top-left block of the full window's index, where we (and timm) build the
    # shrunk window's table; so compare the first three stages, which never shrink here
    # and pad (16, 16, 20), (8, 8, 10), (4, 4, 5) up to window multiples.
    ours = medvit.create_model(
        "swin_tiny_patch4_window7_3d", img_size=(32, 32, 40), patch_size=2, window_size=3,
        embed_dim=12, depth=(2, 2, 2), num_heads=(1, 1, 2),
    ).eval()
    sd = _from_monai_swin(ref.state_dict(), 3)
    sd.update({k: v for k, v in ours.state_dict().items() if k.startswith("norm.")})
    ours.load_state_dict(sd)
    outs = []
    hooks = [getattr(ref, f"layers{i}")[0].blocks[-1].register_forward_hook(
        lambda m, a, y: outs.append(y)) for i in range(1, 4)]
    x = torch.randn(1, 1, 32, 32, 40)
    ref(x)
    for h in hooks:
        h.remove()
    mine = ours.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
    for a, b in zip(mine, outs, strict=True):
        torch.testing.assert_close(a, b.flatten(1, -2), atol=1e-4, rtol=0)


@torch.no_grad()
def test_swin_unetr_layout_options() -> None:
    # the options Swin-UNETR builds its encoder with (MONAI's layout); defaults are timm's
    model = medvit.create_model(
        "swin_tiny_patch4_window7_3d", img_size=32, patch_size=2, embed_dim=6, depth=(2, 1),
        num_heads=(1, 2), window_size=5, final_merge=True, final_norm=False, bias_table="full",
        intermediate_taps="merged",
    ).eval()
    assert model.stage_channels == [6, 12, 24] and model.stage_strides == [2, 4, 8]
    assert len(model.layers[2].blocks) == 0 and isinstance(model.norm, torch.nn.Identity)
    # grid 8 > window 5 keeps its table; the merge-only stage has no attention at all
    assert model.layers[1].window_size == (5, 5, 5)
    x = torch.randn(1, 1, 32, 32, 32)
    feats = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
    torch.testing.assert_close(feats[0], model.patch_embed(x))  # merged input of stage 0
    torch.testing.assert_close(feats[1], model.layers[1].downsample(model.layers[0](model._embed(x))).flatten(1, 3))
    assert [f.shape[1:] for f in feats] == [(16**3, 6), (8**3, 12), (4**3, 24)]
    shrunk = medvit.create_model(
        "swin_tiny_patch4_window7_3d", img_size=32, patch_size=2, embed_dim=6, depth=(1, 1, 1),
        num_heads=(1, 1, 1), window_size=7, bias_table="full",
    )
    attn = shrunk.layers[2].blocks[0].attn  # grid 4 < window 7: MONAI's 13^3 table, 64 x 64 index
    assert attn.relative_position_bias_table.shape == (13**3, 1) and attn.relative_position_index.shape == (64 * 64,)
    assert shrunk.layers[1].blocks[0].attn.relative_position_bias_table.shape == (13**3, 1)
    with pytest.raises(ValueError, match="bias_table"):
        _tiny(bias_table="shrunk")
    with pytest.raises(ValueError, match="intermediate_taps"):
        _tiny(intermediate_taps="blocks")


def test_inference_bias_cache_follows_the_weights() -> None:
    from medvit.layers.window_attention import WindowAttention

    attn = WindowAttention(8, 2, (3, 3)).eval()
    x = torch.randn(1, 6, 6, 8)
    with torch.no_grad():
        before = attn(x)
        attn.relative_position_bias_table.add_(1.0 + torch.randn_like(attn.relative_position_bias_table))
        after = attn(x)
    torch.testing.assert_close(after, attn(x))  # the grad-enabled path recomputes the bias
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 1, 1)])
def test_training_attention_equals_the_inference_path(shift) -> None:
    """With gradients on a CPU the window attention is written out (no SDPA); it computes
    what the SDPA path computes, shifted windows and their masks included, over a batch."""
    from medvit.layers.window_attention import WindowAttention

    attn = WindowAttention(8, 2, (3, 3, 3), shift_size=shift).eval()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 6, 6, 5, 8)  # padded to 6 x 6 x 6, two windows per axis
    with torch.no_grad():
        want = attn(x)
    attn.train()  # no dropout configured: training and evaluation compute the same
    xi = x.clone().requires_grad_()
    got = attn(xi)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0
    assert attn.relative_position_bias_table.grad.abs().sum() > 0


def test_training_attention_keeps_bf16_scores_under_autocast() -> None:
    """Under bf16 autocast the fp32 bias and mask join the scores in bf16 (an fp32 bias would
    promote every score, softmax and cast after it to fp32); the result stays within bf16's
    precision of the fp32 computation, and the bias still gets its gradient."""
    from medvit.layers.window_attention import _biased_attention, _shift_masks

    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 2, 27, 4) for _ in range(3))
    bias = torch.randn(2, 27, 27, requires_grad=True)
    masks = _shift_masks((6, 6, 6), (3, 3, 3), (1, 1, 1), torch.device("cpu"), torch.float32)
    from torch.utils._python_dispatch import TorchDispatchMode

    class SoftmaxInputs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[torch.dtype] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func is torch.ops.aten._softmax.default:
                self.seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    want = _biased_attention(q, k, v, bias.detach(), masks, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16), SoftmaxInputs() as mode:
        got = _biased_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, masks, 0.0)
    assert mode.seen == [torch.bfloat16] and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)
    got.float().sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
