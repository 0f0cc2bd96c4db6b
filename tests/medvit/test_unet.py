"""The plain (nnU-Net) U-Net: parameter counts by hand, output grid, strided stages, deep supervision."""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.models.volume.unet import UNet


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_by_hand_2d() -> None:
    model = UNet(in_chans=1, num_classes=3, img_size=16, spatial_dims=2, features=(4, 8))
    enc0 = 1 * 4 * 9 + 4 * 4 * 9  # two 3x3 convs without bias; instance norms have no parameters
    enc1 = 4 * 8 * 9 + 8 * 8 * 9  # the first one strided
    up = 8 * 4 * 2 * 2  # transposed 2x2, no bias
    fuse = (4 + 4) * 4 * 9 + 4 * 4 * 9  # skip concatenated
    head = 4 * 3 + 3  # 1x1 with bias
    assert _count(model) == enc0 + enc1 + up + fuse + head == 1619


def test_parameter_count_by_hand_3d_with_deep_supervision() -> None:
    f = (2, 4, 4, 8)
    model = UNet(in_chans=2, num_classes=3, img_size=16, spatial_dims=3, features=f, deep_supervision=True)
    widths = (2, *f)
    enc = sum(widths[i] * widths[i + 1] * 27 + widths[i + 1] ** 2 * 27 for i in range(4))
    dec = sum(f[i] * f[i - 1] * 8 + 2 * f[i - 1] * f[i - 1] * 27 + f[i - 1] ** 2 * 27 for i in range(1, 4))
    # decoder outputs at levels 0, 1, 2; nnU-Net supervises all but the coarsest (weight 0)
    heads = (2 * 3 + 3) + (4 * 3 + 3)  # main head and level 1's
    assert _count(model) == enc + dec + heads
    assert len(model.aux_heads) == 1


def test_paper_widths_and_strided_downsampling() -> None:
    with torch.device("meta"):
        m3 = medvit.create_model("unet_nnunet_3d")
        m2 = medvit.create_model("unet_nnunet_2d")
    assert [b.conv1.out_channels for b in m3.encoder] == [32, 64, 128, 256, 320] and m3.stride == 16
    assert [b.conv1.out_channels for b in m2.encoder] == [32, 64, 128, 256, 512, 512] and m2.stride == 32
    assert [b.conv1.stride for b in m3.encoder] == [(1, 1, 1)] + [(2, 2, 2)] * 4
    assert (m3.spatial_dims, m2.spatial_dims, m3.img_size, m2.img_size) == (3, 2, (96,) * 3, (256,) * 2)
    assert m3.encoder[0].residual is False and type(m3.encoder[0].act).__name__ == "LeakyReLU"


def test_output_on_the_input_grid_and_other_sizes() -> None:
    model = UNet(in_chans=3, num_classes=4, img_size=32, spatial_dims=2, features=(4, 8, 8)).eval()
    for size in ((32, 32), (16, 48)):
        assert model(torch.randn(1, 3, *size)).shape == (1, 4, *size)
    model.train()
    out = UNet(num_classes=2, img_size=16, spatial_dims=3, features=(2, 4, 4, 4, 4), deep_supervision=True)(
        torch.randn(1, 1, 16, 16, 16)
    )
    assert [tuple(o.shape[2:]) for o in out] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(img_size=18), "multiple of 4"),
        (dict(features=(4,)), "2 or more"),
        (dict(features=(4, 8, 8), deep_supervision=True), "3 or more levels"),
    ],
)
def test_bad_configurations_raise(kwargs, fragment) -> None:
    args = dict(img_size=16, spatial_dims=2, features=(4, 8, 8))
    with pytest.raises(ValueError, match=fragment):
        UNet(**{**args, **kwargs})


def test_wrong_input_raises() -> None:
    model = UNet(img_size=16, spatial_dims=2, features=(4, 8))
    with pytest.raises(ValueError, match="multiple of 2"):
        model(torch.randn(1, 1, 15, 16))
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(1, 2, 16, 16))
