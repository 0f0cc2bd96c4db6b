"""Windows only over the body: the box, masks inside it, the full grid written."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from helpers import make_tiny_checkpoint
from medvit.pipelines.body import body_box, body_mask_low, window_box
from medvit.pipelines.io import read_scan
from medvit.pipelines.segment import SegmentConfig, Segmenter

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data" / "phantom_segformer3d.safetensors"


def _body_ct(shape=(96, 80, 40), centre=(30, 40, 20), radii=(18, 22, 15)) -> np.ndarray:
    """Air with an ellipsoid of soft tissue, and a few bright voxels far from it (noise)."""
    idx = np.indices(shape).astype(float)
    inside = sum(((i - c) / r) ** 2 for i, c, r in zip(idx, centre, radii)) <= 1
    hu = np.where(inside, 40.0, -1000.0).astype(np.float32)
    hu[90, 5, 35] = 300.0  # a speck outside the body: too small to count
    return hu


def test_box_holds_the_body_with_its_margin_and_not_the_speck() -> None:
    hu = torch.from_numpy(_body_ct())[None]
    box = body_box(hu, spacing=(2.0, 2.0, 2.0), factor=4, margin_mm=4.0)
    assert box is not None
    body = np.argwhere(_body_ct() > -500)[:-1]  # without the speck
    for axis, s in enumerate(box):
        assert s.start <= body[:, axis].min() and s.stop > body[:, axis].max()
        assert s.start >= body[:, axis].min() - 4 - 2 - 4  # margin 2 voxels, block rounding < 4
    assert box[0].stop <= 60  # the speck at i = 90 is left out
    assert body_mask_low(hu).sum() < body_mask_low(torch.full_like(hu, 40.0)).sum()
    full = torch.full_like(hu, 40.0)
    assert body_box(full, (2.0, 2.0, 2.0)) is None  # nothing to save
    assert body_box(torch.full_like(hu, -1000.0), (2.0, 2.0, 2.0)) is None  # no body


def test_window_box_is_the_whole_grids_windows_that_touch_the_body() -> None:
    from medvit.pipelines.stitch import window_starts

    body = (slice(70, 90), slice(0, 10), slice(5, 6))
    box = window_box(body, (200, 64, 40), (32, 32, 32), 0.5, slice_axis=2, halo=1)
    assert box[2] == slice(4, 7)  # the slice axis: the body and one neighbour each side
    full = window_starts(200, 32, 0.5)
    touching = [s for s in full if s < 90 and s + 32 > 70]
    assert box[0] == slice(touching[0], touching[-1] + 32) == slice(48, 112)
    # a window over the box starts exactly where the whole grid's touching windows start
    assert [box[0].start + s for s in window_starts(box[0].stop - box[0].start, 32, 0.5)] == touching
    assert box[1] == slice(0, 32)
    assert window_box((slice(0, 5),) * 3, (20, 20, 20), (32, 32, 32), 0.5) == (slice(0, 20),) * 3


def test_foreground_everywhere_stays_everywhere_inside_the_body(tmp_path) -> None:
    """A model that calls every voxel liver: the mask is liver on every body voxel, on the full grid."""
    hu = _body_ct()
    path = tmp_path / "body.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([3.0, 3.0, 4.0, 1.0])), str(path))
    ckpt = make_tiny_checkpoint(tmp_path / "c.safetensors", spacing=(3.0, 3.0, 4.0))
    seg = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32"))

    class Liver(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 5, *x.shape[2:])
            out[:, 1] = 10.0
            return out

    seg.members[0].model = Liver()
    scan = read_scan(path)
    mask = seg.predict(scan)
    assert mask.shape == scan.shape == hu.shape
    assert (mask[hu > -500][:-1] == 1).all()  # every body voxel (the speck aside)
    run, full = seg.windows
    assert run < full and (mask[80:] == 0).all()  # windows skipped; air beyond the last one is background
    seg_none = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32", body_crop="none"))
    seg_none.members[0].model = Liver()
    assert (seg_none.predict(scan) == 1).all() and seg_none.windows[0] == seg_none.windows[1] == full


def test_crop_agrees_with_the_whole_grid_on_the_dicom_series(shared_data) -> None:
    scan = read_scan(shared_data / "ct_dicom")
    masks, windows = {}, {}
    for crop in ("auto", "none"):
        seg = Segmenter(SAMPLE, SegmentConfig(progress=False, precision="fp32", device="cpu", body_crop=crop))
        masks[crop], windows[crop] = seg.predict(scan), seg.windows
    assert masks["auto"].shape == scan.shape
    assert windows["auto"][0] < windows["none"][0] == windows["auto"][1]
    for label in np.unique(masks["none"])[1:]:
        a, b = masks["auto"] == label, masks["none"] == label
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice >= 0.99, (label, dice)
