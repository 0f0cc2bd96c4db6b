"""PVT v2: configurations and parameter counts, parity with timm, the backbone interface."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

import medvit
from medvit.convert import load_timm

from helpers import require


NAMES = medvit.list_models("pvt_v2_*")
SMALL = dict(img_size=64, depth=(1, 2, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4))


def perturbed(name: str, **kw) -> torch.nn.Module:
    timm = require("timm")
    ref = timm.create_model(name, **kw).eval()
    with torch.no_grad():  # zero biases and unit norms must count too
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return ref


def _timm_small(name: str, num_classes: int = 7) -> torch.nn.Module:
    return perturbed(
        name, depths=SMALL["depth"], embed_dims=SMALL["embed_dim"], num_heads=SMALL["num_heads"],
        num_classes=num_classes,
    )


def test_registered_names_and_parameter_counts_match_timm(timm: ModuleType) -> None:
    assert NAMES == [
        "pvt_v2_b0", "pvt_v2_b0_3d", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3",
        "pvt_v2_b4", "pvt_v2_b5",
    ]
    expected = {"pvt_v2_b0": 3_666_760, "pvt_v2_b2": 25_362_856, "pvt_v2_b5": 81_956_008}
    names = [n for n in NAMES if n in timm.list_models()]
    # every 2D variant has a timm twin; only the volumetric one is ours alone
    assert names == [n for n in NAMES if not n.endswith("_3d")]
    for name in names:
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name
        if name in expected:
            assert ours == expected[name], name


@pytest.mark.parametrize("name", ["pvt_v2_b1", "pvt_v2_b2_li"])
def test_parity_with_timm_small(name: str) -> None:
    ref = _timm_small(name)
    ours = medvit.create_model(name, num_classes=7, **SMALL).eval()
    load_timm(ours, ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
        feats = ours.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(feats, ref.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_parity_full_size_b0() -> None:
    ref = perturbed("pvt_v2_b0")
    # full-size weights; a smaller input (no position table, so any size) keeps it quick
    ours = medvit.create_model("pvt_v2_b0", img_size=96).eval()
    load_timm(ours, ref.state_dict())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_odd_input_size_matches_timm() -> None:
    # the overlapping embeddings pad, so sizes not divisible by 32 keep timm's ceil grids
    ref = _timm_small("pvt_v2_b1")
    ours = medvit.create_model("pvt_v2_b1", num_classes=7, **{**SMALL, "img_size": 72}).eval()
    load_timm(ours, ref.state_dict())
    x = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    feats = ours.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [18, 9, 5, 3]


def test_forward_intermediates_shapes_and_formats() -> None:
    model = medvit.create_model("pvt_v2_b0", num_classes=3, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    final, feats = model.forward_intermediates(x)
    assert model.stage_channels == [16, 32, 48, 64] and model.stage_strides == [4, 8, 16, 32]
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(model.stage_channels, model.stage_strides)
    ]
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, indices=[1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(nlc[0], feats[1].flatten(2).transpose(1, 2))
    early = model.forward_intermediates(x, indices=2, stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], feats[2])
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[4])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_3d_variant_multiscale_features() -> None:
    model = medvit.create_model("pvt_v2_b0_3d", **{**SMALL, "img_size": (32, 32, 32)}).eval()
    assert model.spatial_dims == 3 and model.in_chans == 1
    feats = model.forward_intermediates(torch.randn(1, 1, 32, 32, 32), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (16, 8, 8, 8), (32, 4, 4, 4), (48, 2, 2, 2), (64, 1, 1, 1)
    ]


def test_classifier_reset_pooled_features_and_frozen_patch_embed() -> None:
    model = medvit.create_model("pvt_v2_b0", num_classes=0, freeze_patch_embed=True, **SMALL)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 64) and model.num_features == 64
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert model.stages[1].downsample.proj.weight.requires_grad
    model.reset_classifier(4)
    assert model(x).shape == (2, 4) and model.num_classes == 4
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == (2, 64, 2, 2)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="smaller than the reduction ratio"):
        medvit.create_model("pvt_v2_b0", img_size=16)
    with pytest.raises(ValueError, match="one entry per stage"):
        medvit.create_model("pvt_v2_b0", depth=(2, 2, 2))
    model = medvit.create_model("pvt_v2_b0", **SMALL)
    # sr_ratio 8 needs a stem grid of 8, i.e. sides of at least 29
    with pytest.raises(
        ValueError,
        match=r"input size \(64, 16\) does not fit .*token grid \(16, 4\) is smaller than the"
        " reduction ratio 8",
    ):
        model(torch.randn(1, 3, 64, 16))
    with pytest.raises(ValueError, match="smaller than the reduction ratio"):
        model.forward_intermediates(torch.randn(1, 3, 28, 28))
    assert model.check_input_size((29, 29)) == [(8, 8), (4, 4), (2, 2), (1, 1)]
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 64, 64, 64))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 1, 64, 64))


def test_original_checkpoint_names_load() -> None:
    ref = _timm_small("pvt_v2_b1")
    sd = ref.state_dict()
    original = {}
    for k, v in sd.items():  # timm's names back to the PVT v2 / SegFormer repositories'
        k = k.replace("patch_embed.", "patch_embed1.")
        k = k.replace(".mlp.dwconv.", ".mlp.dwconv.dwconv.")
        for i in range(4):
            k = k.replace(f"stages.{i}.downsample.", f"patch_embed{i + 1}.")
            k = k.replace(f"stages.{i}.blocks.", f"block{i + 1}.")
            k = k.replace(f"stages.{i}.norm.", f"norm{i + 1}.")
        original[k] = v
    assert "block2.1.mlp.dwconv.dwconv.weight" in original and "norm4.weight" in original
    ours = medvit.create_model("pvt_v2_b1", num_classes=7, **SMALL).eval()
    load_timm(ours, original)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name, built, other",
    [
        ("pvt_v2_b1", (64, 64), (96, 64)),
        ("pvt_v2_b2_li", (64, 64), (40, 72)),
        ("mit_b0", (64, 64), (32, 96)),
        ("mit_b0_3d", (32, 32, 32), (32, 64, 48)),
        ("pvt_v2_b0_3d", (32, 32, 32), (64, 32, 48)),
    ],
)
def test_weights_apply_at_any_input_size(
    name: str, built: tuple[int, ...], other: tuple[int, ...]
) -> None:
    """A model built at one size, with the weights of one built at another, runs the other size."""
    torch.manual_seed(0)
    in_chans = 1 if len(built) == 3 else 3
    ref = medvit.create_model(name, num_classes=5, **{**SMALL, "img_size": other}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = medvit.create_model(name, num_classes=5, **{**SMALL, "img_size": built}).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, in_chans, *other)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        feats = model.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(feats, ref.forward_intermediates(x, intermediates_only=True)):
            assert torch.equal(a, b)
        # and the model still runs the size it was built for
        assert model(torch.randn(1, in_chans, *built)).shape == (1, 5)
    assert [tuple(f.shape[2:]) for f in feats] == model.check_input_size(other)
    assert model.patch_embed.img_size == built  # nothing was swapped in to run `other`


def test_other_input_size_matches_timm() -> None:
    ref = _timm_small("pvt_v2_b2_li")
    ours = medvit.create_model("pvt_v2_b2_li", num_classes=7, **SMALL).eval()
    load_timm(ours, ref.state_dict())
    x = torch.randn(1, 3, 88, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)


def test_grid_aware_layers(timm: ModuleType) -> None:
    from medvit.layers.conv_mlp import DWConvMlp
    from medvit.layers.overlap_embed import OverlapPatchEmbed
    from medvit.layers.sra import SpatialReductionAttention

    ref = timm.models.pvt_v2.Attention(16, num_heads=2, sr_ratio=2).eval()
    sra = SpatialReductionAttention(2, 16, 2, sr_ratio=2).eval()
    sra.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for grid in ((4, 6), (6, 4), (3, 5)):
            x = torch.randn(2, grid[0] * grid[1], 16)
            torch.testing.assert_close(sra(x, grid), ref(x, list(grid)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs the token grid"):
        sra(torch.randn(1, 24, 16))
    with pytest.raises(ValueError, match=r"token grid \(1, 8\) is smaller than the reduction ratio 2"):
        sra(torch.randn(1, 8, 16), (1, 8))
    with pytest.raises(ValueError, match="do not fit"):
        sra(torch.randn(1, 24, 16), (5, 5))
    mlp = DWConvMlp(2, 8, 16)
    with pytest.raises(ValueError, match="needs the token grid"):
        mlp(torch.randn(1, 12, 8))
    x = torch.randn(1, 12, 8)
    # the same tokens on another grid are another map: the depthwise conv must see the difference
    assert not torch.allclose(mlp(x, (3, 4)), mlp(x, (4, 3)))
    embed = OverlapPatchEmbed(2, 64, 7, 4, 3, 8)
    tokens, grid = embed(torch.randn(1, 3, 30, 17))
    assert grid == (8, 5) == embed.output_size((30, 17)) and tokens.shape == (1, 40, 8)
    assert embed.grid_size == (16, 16)
