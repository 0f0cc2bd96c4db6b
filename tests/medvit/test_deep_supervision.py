"""Deep supervision of UNETR and Swin-UNETR: aux outputs per level, eval output unchanged."""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.models.volume.unetr import UNETR
from medvit.registry import variant_accepts
from tiny_configs import tiny_overrides

# (variant, spatial dims, decoder levels supervised: the main output and the aux heads)
CASES = [
    ("unetr_tiny", 3, 3),  # patch 16: 4 decoder levels, the coarsest unsupervised
    ("unetr_swin_tiny", 3, 4),  # stride 32: 5 levels
    ("unetr_mit_b0", 3, 4),
    ("swin_unetr_small", 3, 3),  # 3 stages: stride 16, 4 levels
]


def _pair(name: str, **extra: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The variant without and with deep supervision, sharing every weight but the aux heads."""
    args = {**tiny_overrides(name), "num_classes": 3, **extra}
    plain = medvit.create_model(name, **args)
    deep = medvit.create_model(name, **args, deep_supervision=True)
    shared = {k: v for k, v in deep.state_dict().items() if not k.startswith("aux_heads.")}
    plain.load_state_dict(shared)  # strict: the plain model's keys are exactly the shared ones
    return plain, deep


@pytest.mark.parametrize("name, dims, levels", CASES)
def test_aux_outputs_per_level_and_eval_output_unchanged(name: str, dims: int, levels: int) -> None:
    torch.manual_seed(0)
    plain, deep = _pair(name)
    assert plain.aux_heads is None and not any("aux_heads" in k for k in plain.state_dict())
    assert len(deep.aux_heads) == levels - 1
    size = plain.img_size
    x = torch.randn(2, 1, *size)
    torch.manual_seed(1)  # the same stochastic depth draws in both training-mode passes
    outs = deep.train()(x)
    torch.manual_seed(1)
    assert torch.equal(outs[0], plain.train()(x))  # training mode: the same main output
    assert isinstance(outs, list) and len(outs) == levels
    for i, out in enumerate(outs):
        assert out.shape == (2, 3, *(s // 2**i for s in size)), i
    sum(o.float().square().mean() for o in outs[1:]).backward()
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in deep.aux_heads)
    with torch.no_grad():
        plain.eval(), deep.eval()
        out = deep(x)
        assert isinstance(out, torch.Tensor) and torch.equal(out, plain(x))


def test_2d_swin_unetr_and_hierarchical_unetr() -> None:
    torch.manual_seed(0)
    swin = medvit.create_model(
        "swin_unetr_small", **{**tiny_overrides("swin_unetr_small"), "spatial_dims": 2}, deep_supervision=True
    )
    unetr = UNETR(
        "pvt_v2_b1", spatial_dims=2, img_size=64, num_classes=4, feature_size=4, deep_supervision=True,
        encoder_args=dict(depth=(1, 1, 1, 1), embed_dim=(8, 16, 24, 32), num_heads=(1, 2, 3, 4)),
    )
    for model, k, size in ((swin, 3, 32), (unetr, 4, 64)):
        shapes = [tuple(o.shape) for o in model.train()(torch.randn(1, 1, size, size))]
        assert shapes == [(1, k, size >> i, size >> i) for i in range(len(shapes))] and len(shapes) >= 3


def test_needs_three_decoder_levels() -> None:
    vit = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4)
    args = dict(img_size=16, feature_size=4, num_classes=2, skip_indices=(0,), encoder_args=vit)
    UNETR("vit_base_patch16_96_3d", **args)
    with pytest.raises(ValueError, match="deep_supervision needs a decoder of 3 or more levels, this one has 2"):
        UNETR("vit_base_patch16_96_3d", **args, deep_supervision=True)


def test_which_variants_accept_it() -> None:
    for name in ("unetr_base", "unetr_swin_tiny", "swin_unetr_base"):
        assert variant_accepts(name, "deep_supervision"), name
    for name in ("segformer_b0", "vit_base_patch16_224"):
        assert not variant_accepts(name, "deep_supervision"), name
