"""SegFormer: paper sizes, decoder parity with the official computation, 2D/3D shapes, errors."""

from __future__ import annotations

from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

import medvit
from medvit.convert import load_timm
from medvit.layers.mlp_decoder import AllMLPDecoder

ENC = dict(depth=(1, 2, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4))
_MODES = {2: "bilinear", 3: "trilinear"}


def _perturb(module: torch.nn.Module) -> None:
    """Random weights everywhere, BatchNorm statistics included, so no term is trivially zero."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def _reference_decoder(dec: AllMLPDecoder, feats: list[torch.Tensor]) -> torch.Tensor:
    """The official SegFormerHead, written out: project, upsample, concat c4..c1, fuse, classify."""
    size = feats[0].shape[2:]
    sd = len(size)
    conv = {2: F.conv2d, 3: F.conv3d}[sd]
    maps = []
    for f, proj in zip(feats, dec.linear_c):
        b = f.shape[0]
        tokens = f.flatten(2).transpose(1, 2) @ proj.weight.T + proj.bias
        m = tokens.permute(0, 2, 1).reshape(b, -1, *f.shape[2:])
        maps.append(F.interpolate(m, size=size, mode=_MODES[sd], align_corners=False))
    cat = torch.cat(maps[::-1], dim=1)
    fused = conv(cat, dec.linear_fuse.weight.view(*dec.linear_fuse.weight.shape, *([1] * sd)))
    bn = dec.norm
    shape = (1, -1) + (1,) * sd
    fused = (fused - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    fused = torch.relu(fused * bn.weight.view(shape) + bn.bias.view(shape))
    w = dec.linear_pred.weight
    return conv(fused, w.view(*w.shape, *([1] * sd)), dec.linear_pred.bias)


def _count(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def test_registered_names_and_paper_parameter_counts() -> None:
    assert medvit.list_models("segformer*") == [
        "segformer3d_b0", "segformer3d_b1", "segformer_b0", "segformer_b1", "segformer_b2",
        "segformer_b3", "segformer_b4", "segformer_b5",
    ]
    # SegFormer Table 1 (ADE20K: 150 classes, RGB): decoder and total parameters in millions
    paper = {"b0": (0.4, 3.8), "b1": (0.6, 13.7), "b2": (3.3, 27.5), "b3": (3.3, 47.3),
             "b4": (3.3, 64.1), "b5": (3.3, 84.7)}
    for variant, (decoder, total) in paper.items():
        with torch.device("meta"):
            model = medvit.create_model(f"segformer_{variant}", num_classes=150, in_chans=3)
        assert abs(_count(model.decoder) - decoder) < 0.05, variant
        assert abs(_count(model) - total) < 0.05, variant


def test_defaults() -> None:
    with torch.device("meta"):
        m2 = medvit.create_model("segformer_b2")
        m3 = medvit.create_model("segformer3d_b1")
    assert (m2.img_size, m2.in_chans, m2.num_classes, m2.spatial_dims) == ((256, 256), 1, 14, 2)
    assert (m3.img_size, m3.in_chans, m3.num_classes, m3.spatial_dims) == ((96, 96, 96), 1, 14, 3)
    assert m2.decoder.decoder_dim == 768 and m3.decoder.decoder_dim == 256
    assert m3.encoder.stage_channels == [64, 128, 320, 512] and m3.stride == 32


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_decoder_matches_official_computation(spatial_dims: int) -> None:
    torch.manual_seed(0)
    chans, sizes = (8, 16, 24, 32), ((16, 12, 8), (8, 6, 4), (4, 3, 2), (2, 2, 1))
    dec = AllMLPDecoder(spatial_dims, chans, num_classes=5, decoder_dim=12)
    _perturb(dec)
    dec.eval()
    feats = [torch.randn(2, c, *s[:spatial_dims]) for c, s in zip(chans, sizes)]
    with torch.no_grad():
        out = dec(feats)
        torch.testing.assert_close(out, _reference_decoder(dec, feats), atol=1e-4, rtol=0)
    assert out.shape == (2, 5, *sizes[0][:spatial_dims])


def test_end_to_end_parity_with_timm_encoder(timm: ModuleType) -> None:
    """timm's PVT v2 (MiT configuration) + the written-out official head vs our SegFormer."""
    torch.manual_seed(0)
    ref = timm.create_model(
        "pvt_v2_b1", depths=ENC["depth"], embed_dims=ENC["embed_dim"], num_heads=ENC["num_heads"],
        mlp_ratios=(4, 4, 4, 4), num_classes=0, in_chans=2,
    ).eval()
    model = medvit.create_model(
        "segformer_b1", img_size=(64, 96), in_chans=2, num_classes=4, decoder_dim=24, encoder_args=ENC
    ).eval()
    _perturb(ref)
    _perturb(model.decoder)
    load_timm(model.encoder, ref.state_dict())
    x = torch.randn(2, 2, 64, 96)
    with torch.no_grad():
        feats = ref.forward_intermediates(x, intermediates_only=True)
        logits = _reference_decoder(model.decoder, feats)
        expected = F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)
        out = model(x)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
        # other sizes run on the same weights as a model built for them
        other = medvit.create_model(
            "segformer_b1", img_size=(96, 32), in_chans=2, num_classes=4, decoder_dim=24, encoder_args=ENC
        ).eval()
        other.load_state_dict(model.state_dict())
        y = torch.randn(1, 2, 96, 32)
        torch.testing.assert_close(model(y), other(y), atol=1e-5, rtol=0)
    assert model.encoder.patch_embed.img_size == (64, 96) and model(x).shape == (2, 4, 64, 96)


@pytest.mark.parametrize(
    "name, shape", [("segformer_b0", (2, 3, 64, 96)), ("segformer3d_b0", (1, 1, 32, 64, 32))]
)
def test_shapes_and_gradients(name: str, shape: tuple[int, ...]) -> None:
    model = medvit.create_model(
        name, img_size=shape[2:], in_chans=shape[1], num_classes=3, decoder_dim=8, encoder_args=ENC,
        drop_path_rate=0.0,  # a dropped block would leave its parameters without gradient
    )
    x = torch.randn(*shape, requires_grad=True)
    out = model(x)
    assert out.shape == (shape[0], 3, *shape[2:]) and out.is_contiguous()
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    # a larger input of the right stride goes through the same model
    bigger = torch.randn(1, shape[1], *(2 * s for s in shape[2:]))
    assert model.eval()(bigger).shape == (1, 3, *bigger.shape[2:])


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        medvit.create_model("segformer_b0", img_size=100)
    with pytest.raises(ValueError, match="img_size"):
        medvit.create_model("segformer3d_b0", img_size=(96, 96))
    with pytest.raises(ValueError, match="spatial_dims"):
        medvit.create_model("segformer_b0", spatial_dims=4)
    with pytest.raises(ValueError, match="num_classes"):
        medvit.create_model("segformer_b0", num_classes=0, encoder_args=ENC)
    with pytest.raises(ValueError, match="dropout"):
        medvit.create_model("segformer_b0", dropout=1.5, encoder_args=ENC)
    model = medvit.create_model("segformer_b0", img_size=64, num_classes=2, decoder_dim=8, encoder_args=ENC)
    with pytest.raises(ValueError, match=r"input size \(64, 80\) must be a positive multiple of 32"):
        model(torch.randn(1, 1, 64, 80))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 1, 64, 64, 64))
    with pytest.raises(ValueError, match="expected 4 feature maps"):
        model.decoder([torch.randn(1, 16, 8, 8)])


@pytest.mark.parametrize(
    "name, built, other",
    [("segformer_b0", (64, 64), (96, 32)), ("segformer3d_b0", (32, 32, 32), (64, 32, 96))],
)
def test_weights_apply_at_any_input_size(
    name: str, built: tuple[int, ...], other: tuple[int, ...]
) -> None:
    """Built at one size with the weights of a model built at another: the same output there."""
    torch.manual_seed(0)
    kw = dict(num_classes=3, decoder_dim=8, encoder_args=ENC)
    ref = medvit.create_model(name, img_size=other, **kw)
    _perturb(ref)
    ref.eval()
    model = medvit.create_model(name, img_size=built, **kw).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    before = {n: getattr(m, "grid_size", None) for n, m in model.named_modules()}
    x = torch.randn(1, 1, *other)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out, ref(x)) and out.shape == (1, 3, *other)
    # no grid was swapped in and left behind
    assert {n: getattr(m, "grid_size", None) for n, m in model.named_modules()} == before
    assert model.encoder.patch_embed.img_size == built


def test_input_too_small_for_the_encoder_raises() -> None:
    model = medvit.create_model(
        "segformer_b0", img_size=64, num_classes=2, decoder_dim=8,
        encoder_args={**ENC, "sr_ratios": (16, 4, 2, 1)},
    )
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match=r"input size \(32, 64\) does not fit .*reduction ratio 16"):
        model(torch.randn(1, 1, 32, 64))
