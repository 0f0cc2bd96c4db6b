"""Streaming sliding window and slab-wise inversion against MONAI's own functions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from medvit.pipelines.sampling import class_argmax
from medvit.pipelines.stitch import (
    accumulator_device,
    invert_argmax,
    invert_probabilities,
    stream_probabilities,
    slice_windows,
    window_runs,
    window_starts,
)


class LocalNet(torch.nn.Module):
    """Window-position-dependent logits, so stitching errors show."""

    def __init__(self, k: int = 3, in_chans: int = 1, spatial_dims: int = 3) -> None:
        super().__init__()
        conv = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
        self.conv = conv(in_chans, k, 3, padding=1)
        self.bias = torch.nn.Parameter(torch.randn(k, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[-1])
        return self.conv(x) + self.bias * ramp


@pytest.mark.parametrize("size,roi,overlap", [(50, 16, 0.5), (16, 16, 0.5), (37, 12, 0.25), (30, 16, 0.0)])
def test_window_starts_are_monais(size, roi, overlap) -> None:
    interval = int(roi * (1 - overlap)) if roi != size else roi
    monai = sorted({s[0].start for s in dense_patch_slices((size,), (roi,), (max(interval, 1),))})
    assert window_starts(size, roi, overlap) == monai


# streamed along z, x (the longest), x with a tie, and smaller than the window; overlaps
# above 0.5 keep more planes than a row finishes (the accumulator slides onto itself)
@pytest.mark.parametrize(
    "shape,overlap",
    [((40, 33, 45), 0.5), ((47, 33, 40), 0.5), ((40, 33, 40), 0.5), ((20, 14, 9), 0.5),
     ((24, 20, 45), 0.75), ((24, 20, 45), 0.25)],
)
def test_stream_equals_monai_sliding_window(shape, overlap) -> None:
    torch.manual_seed(0)
    net = LocalNet().eval()
    image = torch.rand(1, *shape)
    with torch.no_grad():
        ref = sliding_window_inference(image[None], (16, 16, 16), 3, net, overlap, "gaussian")[0]
        ref = torch.softmax(ref, 0)
        ours = stream_probabilities(net, image, (16, 16, 16), 3, 3, overlap, torch.float32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    fp16 = stream_probabilities(net, image, (16, 16, 16), 3, 3, overlap, torch.float16)
    assert fp16.dtype == torch.float16 and (fp16.float() - ref).abs().max() < 1e-3


# streamed along z and along x (the longest: the region is permuted with the image)
@pytest.mark.parametrize("shape", [(40, 33, 45), (47, 33, 40)])
def test_windows_holding_no_region_are_skipped_and_the_region_is_exact(shape) -> None:
    torch.manual_seed(0)
    net = LocalNet().eval()
    image = torch.rand(1, *shape)
    region = torch.zeros(shape, dtype=torch.bool)
    region[2:10, 25:31, 30:38] = True  # a blob in one corner
    calls = []

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return net(x)

    with torch.no_grad():
        ref = torch.softmax(sliding_window_inference(image[None], (16, 16, 16), 3, net, 0.5, "gaussian")[0], 0)
        ours = stream_probabilities(counted, image, (16, 16, 16), 3, 3, 0.5, torch.float32, region=region)
    # the windows that run: MONAI's windows that hold some of the region, and only those
    windows = dense_patch_slices(shape, (16, 16, 16), (8, 8, 8))
    held = [w for w in windows if region[w].any()]
    assert 0 < sum(calls) == len(held) == window_runs(shape, (16, 16, 16), 0.5, region).sum() < len(windows)
    # every region voxel lies only in windows that run: its probabilities are the whole run's
    torch.testing.assert_close(ours[:, region], ref[:, region], atol=1e-5, rtol=0)
    covered = torch.zeros(shape, dtype=torch.bool)
    for w in held:
        covered[w] = True
    assert (ours[0, ~covered] == 1).all() and (ours[1:, ~covered] == 0).all()  # no window ran: background
    assert not torch.allclose(ours[:, covered & ~region], ref[:, covered & ~region], atol=1e-3)  # blended from fewer
    # no region at all runs nothing; the whole grid as region runs everything
    assert not window_runs(shape, (16, 16, 16), 0.5, torch.zeros(shape, dtype=torch.bool)).any()
    assert window_runs((9, 20, 16), (16, 16, 16), 0.5, torch.ones(9, 20, 16, dtype=torch.bool)).shape == (1, 2, 1)


# planes larger than the window (two overlaps) and smaller than it along one axis (padded)
@pytest.mark.parametrize("shape,overlap", [((5, 2, 40, 29), 0.5), ((5, 2, 40, 29), 0.25), ((4, 2, 11, 37), 0.5)])
def test_slice_windows_equal_monai_sliding_window(shape, overlap) -> None:
    torch.manual_seed(0)
    net = LocalNet(4, in_chans=2, spatial_dims=2).eval()
    planes = torch.rand(*shape)
    with torch.no_grad():
        ref = torch.softmax(sliding_window_inference(planes, (16, 16), 3, net, overlap, "gaussian"), 1)
        ours = slice_windows(net, planes, (16, 16), 4, 3, overlap)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_inversion_identity_and_permuted_flipped() -> None:
    torch.manual_seed(0)
    prob = torch.softmax(torch.randn(4, 6, 7, 8), 0)
    torch.testing.assert_close(invert_probabilities(prob, np.eye(4), (6, 7, 8)), prob)
    # scan axes (i, j, k) = model (z, -y, x): a permutation with a flip
    m = np.array([[0, 0, 1, 0], [0, -1, 0, 6], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    expected = prob.permute(0, 3, 2, 1).flip(2)
    torch.testing.assert_close(invert_probabilities(prob, m, (8, 7, 6)), expected)
    keep = np.array([True, False, True, True])
    labels = invert_argmax(prob, m, (8, 7, 6), keep, budget_voxels=50)  # many small slabs
    idx = torch.tensor([0, 2, 3])
    np.testing.assert_array_equal(labels, idx[expected[idx].argmax(0)].numpy())


def test_inversion_interpolates_linearly_and_clamps_at_edges() -> None:
    ramp = torch.arange(5.0)[None, :, None, None].expand(1, 5, 2, 2).contiguous()
    m = np.diag([0.5, 1.0, 1.0, 1.0])  # scan voxel i sits at model x = i / 2
    out = invert_probabilities(ramp, m, (12, 2, 2))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4, 4, 4]))


@pytest.mark.parametrize("classes", [1, 5, 300])
def test_class_argmax_is_torchs_argmax_first_on_ties(classes) -> None:
    torch.manual_seed(0)
    p = torch.randint(0, 4, (classes, 7, 6, 5)).float()  # few values: many ties
    for layout in (p, p.movedim(0, -1).contiguous().movedim(-1, 0)):  # classes outermost, and innermost
        got = class_argmax(layout)
        assert got.dtype == (torch.uint8 if classes <= 256 else torch.int64)
        assert torch.equal(got.long(), p.argmax(0))


def test_accumulator_goes_to_the_cpu_when_it_would_not_fit_the_gpu(monkeypatch) -> None:
    """MONAI's `sw_device`/`device` split, decided from free GPU memory (faked: no GPU here)."""
    gpu = torch.device("cuda", 0)
    image = SimpleNamespace(device=gpu, shape=(1, 512, 512, 400))
    need = 4 * (14 + 1) * 512 * 512 * 96  # fp32 accumulator and weight sum, one window deep
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * need, 80 * 2**30))
    assert accumulator_device(image, 14, (96, 96, 96)) == gpu
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * need, 80 * 2**30))
    assert accumulator_device(image, 14, (96, 96, 96)) == torch.device("cpu")
    cpu_image = torch.zeros(1, 4, 4, 4)
    assert accumulator_device(cpu_image, 14, (96, 96, 96)) == torch.device("cpu")
