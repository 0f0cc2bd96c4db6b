"""UNETR on any encoder: hierarchical (Swin, PVT v2, MiT) encoders in 3D and 2D."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
import torch
import torch.nn as nn

import medvit
from medvit import registry
from medvit.models.image.pvt_v2 import PyramidVisionTransformerV2
from medvit.models.image.swin import SwinTransformer
from medvit.models.volume import unetr
from medvit.models.volume.unetr import UNETR
from tiny_configs import tiny_overrides

from helpers import require

NEW = ["unetr_swin_tiny", "unetr_pvt_v2_b1", "unetr_mit_b0"]
TINY_SWIN = dict(embed_dim=16, depth=(2, 2, 1, 1), num_heads=(1, 2, 2, 2), window_size=4)
TINY_PYRAMID = dict(depth=(1, 1, 1, 1), embed_dim=(8, 16, 24, 32), num_heads=(1, 2, 3, 4))


@pytest.mark.parametrize("name", NEW)
def test_tiny_3d_shapes_and_encoder_geometry(name: str) -> None:
    model = medvit.create_model(name, **tiny_overrides(name), in_chans=2, num_classes=5).eval()
    assert model.hierarchical and model.spatial_dims == 3 and model.stride == 32
    assert model.encoder.spatial_dims == 3 and model.encoder.in_chans == 2
    assert tuple(model.encoder.img_size) == model.img_size == (32, 32, 32)
    assert model.skip_indices == (0, 1, 2, 3) and len(model.down) == 1 and len(model.ups) == 5
    with torch.no_grad():
        out = model(torch.randn(1, 2, 32, 32, 32))
    assert out.shape == (1, 5, 32, 32, 32) and torch.isfinite(out).all()


def test_swin_accepts_other_multiples_of_the_stride() -> None:
    model = medvit.create_model("unetr_swin_tiny", **tiny_overrides("unetr_swin_tiny"), num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 32, 96)).shape == (1, 3, 64, 32, 96)


@pytest.mark.parametrize(
    "encoder, args",
    [("swin_tiny_patch4_window7_224", TINY_SWIN), ("pvt_v2_b1", TINY_PYRAMID)],
)
def test_2d_hierarchical_encoder(encoder: str, args: dict) -> None:
    model = medvit.create_model(
        "unetr_base", encoder=encoder, spatial_dims=2, img_size=64, in_chans=3, num_classes=4,
        encoder_args=args,
    ).eval()
    assert model.hierarchical and model.encoder.spatial_dims == 2 and model.img_size == (64, 64)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4, 64, 64)


def test_gradients_reach_every_part() -> None:
    model = medvit.create_model("unetr_swin_tiny", **tiny_overrides("unetr_swin_tiny"), num_classes=3)
    model(torch.randn(2, 1, 32, 32, 32)).square().mean().backward()
    for part in ("encoder", "stem", "down", "skips", "ups", "head"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part


def test_encoder_by_name_picks_the_hierarchical_path() -> None:
    with torch.device("meta"):
        model = medvit.create_model(
            "unetr_base", encoder="swin_tiny_patch4_window7_3d", in_chans=2, img_size=64
        )
    assert isinstance(model.encoder, SwinTransformer) and model.hierarchical
    assert model.encoder.in_chans == 2 and tuple(model.encoder.img_size) == (64, 64, 64)
    # none of unetr_base's MONAI ViT defaults (no q/k/v bias) leak into another encoder
    assert model.encoder.layers[0].blocks[0].attn.qkv.bias is not None
    assert model.stem.conv1.out_channels == 16
    with torch.device("meta"):
        plain = UNETR("vit_base_patch16_96_3d")
    assert not plain.hierarchical and plain.skip_indices == (3, 6, 9) and plain.encoder.cls_token is None


def _encoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Record every encoder UNETR builds by name (the arguments it passes)."""
    calls: list[tuple[str, dict[str, Any]]] = []

    def create(name: str, **args: Any) -> nn.Module:
        calls.append((name, args))
        return medvit.create_model(name, **args)

    monkeypatch.setattr(unetr, "create_model", create)
    return calls


def test_single_scale_encoders_are_built_once_without_class_token(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _encoder_calls(monkeypatch)
    # the hybrid ViT's class passes **kwargs on to VisionTransformer, which takes class_token;
    # MViT has stage maps and a class token, which goes off as well
    for name in ("vit_base_patch16_96_3d", "vit_base_r50_s16_96_3d", "mvit_b_16_3d"):
        assert unetr._takes_class_token(name), name
    with torch.device("meta"):
        model = UNETR("vit_base_patch16_96_3d")
    assert [(n, a["class_token"]) for n, a in calls] == [("vit_base_patch16_96_3d", False)]
    assert model.encoder.cls_token is None and model.encoder.num_prefix_tokens == 0


def test_hierarchical_encoders_never_receive_class_token(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _encoder_calls(monkeypatch)
    for name in ("swin_tiny_patch4_window7_3d", "pvt_v2_b1", "mit_b0"):
        assert not unetr._takes_class_token(name), name
    with torch.device("meta"):
        medvit.create_model("unetr_swin_tiny")
        medvit.create_model("unetr_mit_b0")
    assert [n for n, _ in calls] == ["swin_tiny_patch4_window7_3d", "mit_b0"]
    assert not any("class_token" in a for _, a in calls)


def test_class_token_in_encoder_args_is_passed_through(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _encoder_calls(monkeypatch)
    vit = dict(embed_dim=32, depth=3, num_heads=2, class_token=True)
    model = UNETR(
        "vit_base_patch16_96_3d", img_size=32, feature_size=4, num_classes=2, skip_indices=(0, 1, 2), encoder_args=vit
    ).eval()
    assert [a["class_token"] for _, a in calls] == [True]
    assert model.encoder.num_prefix_tokens == 1  # the decoder drops the class token
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)
    # a hierarchical encoder gets it too, and refuses it as any unknown argument
    with pytest.raises(ValueError, match="invalid arguments for model 'mit_b0'.*class_token"):
        UNETR("mit_b0", img_size=32, encoder_args=dict(class_token=False))


def test_class_token_rule_needs_the_variant_class(monkeypatch: pytest.MonkeyPatch) -> None:
    def unannotated(**kwargs):
        raise AssertionError("the rule builds nothing")

    monkeypatch.setattr(registry, "model_entrypoint", lambda name: unannotated)
    with pytest.raises(TypeError, match="'vit_x' names no model class"):
        unetr._takes_class_token("vit_x")


def test_class_token_rule_imports_the_family_and_builds_nothing() -> None:
    probe = (
        "import json, sys\n"
        "from medvit.models.volume.unetr import _takes_class_token\n"
        "before = 'medvit.models.image.swin' in sys.modules\n"
        "answer = _takes_class_token('swin_tiny_patch4_window7_3d')\n"
        "print(json.dumps([before, answer, 'medvit.models.image.swin' in sys.modules, 'sympy' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [False, False, True, False]


class FakePyramid(nn.Module):
    """Stage maps of known values; records how the decoder asks for them."""

    def __init__(
        self, strides: Sequence[int] = (4, 8, 16, 32), channels: Sequence[int] = (3, 5, 6, 7)
    ) -> None:
        super().__init__()
        self.stage_strides = list(strides)
        self.stage_channels = list(channels)
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []
        self.maps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the decoder must read the encoder through forward_intermediates")

    def forward_intermediates(self, x: torch.Tensor, indices=None, norm=False, output_fmt="NCHW",
                              intermediates_only=False, stop_early=False):
        self.calls.append(
            dict(indices=tuple(indices), output_fmt=output_fmt, intermediates_only=intermediates_only)
        )
        g = torch.Generator().manual_seed(len(self.calls))
        self.maps = [
            torch.randn(x.shape[0], c, *(n // s for n in x.shape[2:]), generator=g) * self.scale
            for c, s in zip(self.stage_channels, self.stage_strides)
        ]
        return self.maps if intermediates_only else (self.maps[-1], self.maps)


def test_skips_are_the_encoders_stage_maps() -> None:
    enc = FakePyramid()
    model = UNETR(enc, in_chans=1, num_classes=2, img_size=32, feature_size=4).eval()
    seen: dict[str, torch.Tensor] = {}
    for i, skip in enumerate(model.skips):
        skip.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(f"skip{i}", args[0]))
    model.ups[0].register_forward_hook(lambda m, args, out: seen.__setitem__("bottleneck", args[0]))
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 32, 32))
    assert enc.calls == [dict(indices=(0, 1, 2, 3), output_fmt="NCHW", intermediates_only=True)]
    for i in range(3):
        torch.testing.assert_close(seen[f"skip{i}"], enc.maps[i], atol=0, rtol=0)
    torch.testing.assert_close(seen["bottleneck"], enc.maps[3], atol=0, rtol=0)
    # widths follow the encoder's attributes: stage i feeds level log2(stride i)
    assert [s.conv1.in_channels for s in model.skips] == [3, 5, 6]
    assert [s.conv1.out_channels for s in model.skips] == [16, 32, 64]
    assert model.ups[0].up.in_channels == 7


def test_stride_2_encoder_needs_no_input_path() -> None:
    model = UNETR(FakePyramid((2, 4, 8), (3, 5, 6)), in_chans=1, num_classes=2, img_size=16, feature_size=4)
    assert model.stride == 8 and len(model.down) == 0 and len(model.skips) == 2
    assert model(torch.randn(1, 1, 16, 8, 16)).shape == (1, 2, 16, 8, 16)


def test_bad_arguments_and_inputs_raise_value_error() -> None:
    model = medvit.create_model("unetr_swin_tiny", **tiny_overrides("unetr_swin_tiny"))
    with pytest.raises(ValueError, match=re.escape("(48, 32, 32) is not a multiple of the model's total stride")):
        model(torch.randn(1, 1, 48, 32, 32))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="not a multiple of the total stride 32"):
        medvit.create_model("unetr_swin_tiny", **{**tiny_overrides("unetr_swin_tiny"), "img_size": 48})
    with pytest.raises(ValueError, match="hierarchical encoder feeds every stage"):
        medvit.create_model("unetr_swin_tiny", **tiny_overrides("unetr_swin_tiny"), skip_indices=(0, 1))
    with pytest.raises(ValueError, match="stage strides doubling"):
        UNETR(FakePyramid((4, 16), (3, 5)), img_size=32)
    with pytest.raises(ValueError, match="power-of-two stage strides"):
        UNETR(FakePyramid((3, 6), (3, 5)), img_size=24)
    with pytest.raises(ValueError, match="needs a hierarchical encoder"):
        UNETR(nn.Linear(2, 2), img_size=32)


def test_pvt_v2_unetr_runs_at_another_size_as_if_built_there() -> None:
    args = tiny_overrides("unetr_pvt_v2_b1")
    built = medvit.create_model("unetr_pvt_v2_b1", **args).eval()
    there = medvit.create_model("unetr_pvt_v2_b1", **{**args, "img_size": (64, 32, 32)}).eval()
    there.load_state_dict(built.state_dict())
    x = torch.randn(1, 1, 64, 32, 32)
    with torch.no_grad():
        assert torch.equal(built(x), there(x))


def test_full_size_parameter_counts() -> None:
    # No paper reports these encoder/decoder pairs; the counts pin the configuration
    # (for scale: Swin-UNETR, feature size 48, is 62.19M). unetr_base must stay MONAI's.
    expected = {
        "unetr_base": (92_784_046, 88_340_736),
        "unetr_swin_tiny": (44_357_456, 29_192_610),
        "unetr_pvt_v2_b1": (37_454_190, 23_579_584),
        "unetr_mit_b0": (17_810_574, 5_873_376),
    }
    for name, (total, encoder) in expected.items():
        with torch.device("meta"):
            model = medvit.create_model(name)
        assert sum(p.numel() for p in model.parameters()) == total, name
        assert sum(p.numel() for p in model.encoder.parameters()) == encoder, name
        assert model.img_size == (96, 96, 96) and model.in_chans == 1 and model.num_classes == 14
    with torch.device("meta"):
        assert isinstance(medvit.create_model("unetr_pvt_v2_b1").encoder, PyramidVisionTransformerV2)


def _load_from_monai(ours: nn.Module, ref: nn.Module) -> None:
    """Copy a MONAI UnetrBasicBlock / UnetrUpBlock / UnetOutBlock into its medvit twin."""
    rules = [
        (r"^layer\.", ""), (r"^transp_conv\.conv\.", "up."), (r"^conv_block\.", "fuse."),
        (r"conv3\.conv\.", "shortcut.0."), (r"conv(\d)\.conv\.", r"conv\1."), (r"^conv\.conv\.", ""),
    ]
    state = {}
    for k, v in ref.state_dict().items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        state[k] = v.reshape(ours.state_dict()[k].shape)
    ours.load_state_dict(state, strict=True)


@torch.no_grad()
def test_decoder_parity_with_monai_blocks() -> None:
    """The decoder equals MONAI's UNETR blocks wired as documented, on the same encoder maps."""
    blocks = require("monai.networks.blocks")
    fs, model = 6, medvit.create_model(
        "unetr_swin_tiny", img_size=32, feature_size=6, in_chans=2, num_classes=3, encoder_args=TINY_SWIN
    ).eval()
    widths = [fs * 2**i for i in range(5)]
    basic = lambda i, o: blocks.UnetrBasicBlock(3, i, o, 3, 1, "instance", res_block=True)  # noqa: E731
    ref_stem = basic(2, fs)
    ref_down = basic(widths[1], widths[1])
    ref_skips = [basic(c, widths[i + 2]) for i, c in enumerate(model.encoder.stage_channels[:-1])]
    ref_ups = [
        blocks.UnetrUpBlock(3, model.encoder.stage_channels[-1] if i == 4 else widths[i + 1], widths[i], 3, 2,
                            "instance", res_block=True)
        for i in reversed(range(5))
    ]
    ref_head = blocks.UnetOutBlock(3, fs, 3)
    for ref in (ref_stem, ref_down, *ref_skips, *ref_ups, ref_head):
        for p in ref.parameters():  # every tensor counts
            p.add_(torch.randn_like(p) * 0.05)
        ref.eval()
    _load_from_monai(model.stem, ref_stem)
    _load_from_monai(model.down[0][1], ref_down)
    for ours, ref in zip([*model.skips, *model.ups, model.head], [*ref_skips, *ref_ups, ref_head]):
        _load_from_monai(ours, ref)

    x = torch.randn(2, 2, 32, 32, 32)
    feats = model.encoder.forward_intermediates(x, norm=True, intermediates_only=True)
    skips = [ref_stem(x), ref_down(model.down[0][0](x))] + [r(f) for r, f in zip(ref_skips, feats)]
    y = feats[-1]
    for up, skip in zip(ref_ups, reversed(skips)):
        y = up(y, skip)
    torch.testing.assert_close(model(x), ref_head(y), atol=1e-4, rtol=0)
