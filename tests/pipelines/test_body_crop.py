"""Windows only over the body: the box, masks inside it, the full grid written."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from helpers import make_tiny_checkpoint
from medvit.pipelines.body import body_box, body_mask, body_mask_low, window_box
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


def test_the_table_under_the_patient_is_not_body() -> None:
    hu = _body_ct()
    hu[:, 68:70, :] = 200.0  # a plate 2 voxels thick across the whole field of view, under the body
    hu = torch.from_numpy(hu)[None]
    box = body_box(hu, spacing=(2.0, 2.0, 2.0), factor=4, margin_mm=4.0)
    assert box is not None and box[0].stop <= 60 and box[1].stop <= 68  # the body's box, not the table's
    mask = body_mask(hu, (2.0, 2.0, 2.0))
    assert not mask[80:, 68:70].any()  # the table away from the body
    # opened in all three axes (no head-foot axis given), the same
    assert body_box(hu, (2.0, 2.0, 2.0), factor=4, margin_mm=4.0, axial_axis=None) == box


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


class Liver(torch.nn.Module):
    """Calls every voxel liver."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 5, *x.shape[2:])
        out[:, 1] = 10.0
        return out


def _liver_everywhere(tmp_path: Path, hu: np.ndarray) -> tuple[Segmenter, Path, str]:
    """`hu` saved at 3 x 3 x 4 mm, and a segmenter on that grid whose model is `Liver`."""
    path = tmp_path / "body.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([3.0, 3.0, 4.0, 1.0])), str(path))
    ckpt = make_tiny_checkpoint(tmp_path / "c.safetensors", spacing=(3.0, 3.0, 4.0))
    seg = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32"))
    seg.members[0].model = Liver()
    return seg, ckpt, read_scan(path)


def test_foreground_everywhere_stays_everywhere_inside_the_body(tmp_path) -> None:
    """A model that calls every voxel liver: the mask is liver on every body voxel, on the full grid."""
    hu = _body_ct()
    seg, ckpt, scan = _liver_everywhere(tmp_path, hu)
    mask = seg.predict(scan)
    assert mask.shape == scan.shape == hu.shape
    assert (mask[hu > -500][:-1] == 1).all()  # every body voxel (the speck aside)
    run, full = seg.windows
    assert run < full and (mask[80:] == 0).all()  # windows skipped; air beyond the last one is background
    seg_none = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32", body_crop="none"))
    seg_none.members[0].model = Liver()
    assert (seg_none.predict(scan) == 1).all() and seg_none.windows[0] == seg_none.windows[1] == full


def test_body_mask_is_the_body_grown_by_its_margin() -> None:
    hu = _body_ct()
    mask = body_mask(torch.from_numpy(hu)[None], spacing=(2.0, 2.0, 2.0), factor=4, margin_mm=16.0)
    assert mask.shape == hu.shape and mask.dtype == torch.bool
    body = hu > -500
    body[90, 5, 35] = False  # the speck is not body
    assert mask[torch.from_numpy(body)].all()
    # the margin, less what the blocks at the body's edge (under half body) lose: < 4 voxels
    grown = torch.from_numpy(ndimage.binary_dilation(body, iterations=4))  # 8 mm at 2 mm
    assert mask[grown].all()
    assert not mask[90, 5, 35] and not mask[80:].any()  # far from the body: not in it
    assert body_mask(torch.full((1, 20, 20, 20), -1000.0), (2.0, 2.0, 2.0)) is None


def test_windows_between_two_bodies_are_skipped(tmp_path) -> None:
    """Two legs in opposite corners: their box is the whole grid, yet the windows that hold
    neither are skipped, and every body voxel still gets the model's answer."""
    idx = np.indices((112, 112, 32)).astype(float)
    legs = [sum(((i - c) / 10.0) ** 2 for i, c in zip(idx[:2], centre)) <= 1 for centre in ((14, 14), (97, 97))]
    hu = np.where(legs[0] | legs[1], 40.0, -1000.0).astype(np.float32)
    seg, _, scan = _liver_everywhere(tmp_path, hu)
    prepared = seg.prepare(scan)
    assert prepared.box is None and prepared.body is not None  # the box would save nothing
    mask = seg.predict(prepared)
    assert mask.shape == scan.shape
    assert (mask[hu > -500] == 1).all()  # every body voxel
    run, full = seg.windows
    assert full == 36 and run <= 20, (run, full)  # 6 x 6 windows of 32 in plane; few hold a leg
    assert (mask[:32, 80:] == 0).all() and (mask[80:, :32] == 0).all()  # the other corners: no window ran
    seg.config.tta = True  # flipped, the body is flipped with the image
    assert (seg.predict(scan)[hu > -500] == 1).all() and seg.windows[0] < seg.windows[1]


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
