"""2D models on volumes: slab stacking, slice-wise inference, 2D training samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from medvit.pipelines.errors import MedvitError
from medvit.pipelines.slicing import SliceSpec, parse_axis, slab_stack
from medvit.pipelines.io import read_scan
from medvit.pipelines.segment import SegmentConfig, Segmenter
from medvit.pipelines.stitch import stream_slice_probabilities
from medvit.pipelines.transforms import SlabToChannelsd

from helpers import make_tiny_checkpoint

THRESHOLD_HU = 90.0


class CentreThreshold(nn.Module):
    """A 2D 'model': class 1 where the centre channel of the slab exceeds `level`."""

    spatial_dims = 2

    def __init__(self, slab: int, level: float, num_classes: int = 5) -> None:
        super().__init__()
        self.in_chans, self.level, self.num_classes = slab, level, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1] == self.in_chans
        centre = x[:, self.in_chans // 2]
        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[2:])
        out[:, 1] = 50.0 * (centre - self.level)
        return out


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slab_stack_takes_neighbours_and_repeats_edges(axis: int) -> None:
    vol = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    spec = SliceSpec(axis, 3)
    depth = vol.shape[1 + axis]
    out = slab_stack(vol, spec, torch.arange(depth))
    assert out.shape == (depth, 6, *[s for i, s in enumerate(vol.shape[1:]) if i != axis])
    for i in range(depth):
        for j, off in enumerate((-1, 0, 1)):
            src = vol.select(1 + axis, min(max(i + off, 0), depth - 1))
            torch.testing.assert_close(out[i, 2 * j : 2 * j + 2], src)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_probabilities_2d_match_per_slice(axis: int) -> None:
    torch.manual_seed(0)
    vol = torch.rand(1, 9, 10, 11)
    model = CentreThreshold(3, 0.5)
    out = stream_slice_probabilities(model, vol, (6, 6), 5, SliceSpec(axis, 3), 2, 0.5, torch.float32, slice_batch=4)
    assert out.shape == (5, 9, 10, 11)
    logits = torch.zeros(5, 9, 10, 11)
    logits[1] = 50.0 * (vol[0] - 0.5)
    torch.testing.assert_close(out, torch.softmax(logits, 0), atol=1e-4, rtol=0)


@pytest.mark.parametrize("axis,slab", [(2, 3), (0, 1), (1, 5)])
def test_2d_model_mask_is_exact_on_the_input_grid(tmp_path, phantom_scan, axis: int, slab: int) -> None:
    """Model space = the scan's grid (only reorientation): slice-wise masks must be exact."""
    img, _ = phantom_scan
    ckpt = make_tiny_checkpoint(tmp_path / "c.safetensors", spacing=(3.0, 3.0, 6.0))
    seg = Segmenter(ckpt, SegmentConfig(progress=False, overlap=0.25, precision="fp32"))
    level = (THRESHOLD_HU + 0.5 + 175.0) / 425.0  # between integer HU values: no ties
    seg.members[0].model, seg.members[0].slices = CentreThreshold(slab, level), SliceSpec(axis, slab)
    seg.card.patch_size = (24, 24)
    scan = read_scan(img)
    mask = seg.predict(scan)
    np.testing.assert_array_equal(mask, (scan.array > THRESHOLD_HU).astype(np.uint8))


def test_slab_to_channels_matches_inference_stacking() -> None:
    vol = torch.rand(1, 8, 9, 5)
    d = SlabToChannelsd(axis=2)({"image": vol, "label": torch.arange(5.0).expand(1, 8, 9, 5)})
    assert d["image"].shape == (5, 8, 9) and d["label"].shape == (1, 8, 9)
    assert (d["label"] == 2).all()  # the centre slice's label
    torch.testing.assert_close(d["image"], slab_stack(vol, SliceSpec(2, 5), torch.tensor([2]))[0])


def test_bad_slicing_settings() -> None:
    with pytest.raises(MedvitError, match="odd"):
        SliceSpec(2, 2)
    with pytest.raises(MedvitError, match="slice axis"):
        SliceSpec(3, 1)
    with pytest.raises(MedvitError, match="slice axis"):
        parse_axis("transverse")
    assert parse_axis("coronal") == 1 and parse_axis("0") == 0
