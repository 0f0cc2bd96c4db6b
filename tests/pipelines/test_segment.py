"""Segmentation pipeline: masks land on the input's grid, in the right place."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

import medvit
from medvit.pipelines.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.io import read_scan
from medvit.pipelines.segment import SegmentConfig, Segmenter, label_counts, segment

from helpers import make_tiny_checkpoint

THRESHOLD_HU = 90.0  # kidneys, aorta and bone of the phantom


def _threshold_logits(seg: Segmenter, prep_window=(-175.0, 250.0)):
    """Replace the network by 'class 1 where HU > THRESHOLD_HU', computed in model space."""
    lo, hi = prep_window
    level = (THRESHOLD_HU - lo) / (hi - lo)

    def fake(images: list[torch.Tensor], box=None, body=None) -> torch.Tensor:  # noqa: ANN001 - the whole grid, box or not
        x = torch.as_tensor(images[0])[0]
        out = torch.zeros(seg.card.num_classes, *x.shape)
        out[1] = (x > level).float()
        out[0] = 1.0 - out[1]
        return out

    return fake


def test_mask_is_exact_when_model_space_equals_input_grid(tmp_path, phantom_scan) -> None:
    """Target spacing = the scan's: only reorientation happens, so inversion must be exact."""
    img, _ = phantom_scan
    ckpt = make_tiny_checkpoint(tmp_path / "c.safetensors", spacing=(3.0, 3.0, 6.0))
    seg = Segmenter(ckpt, SegmentConfig(progress=False))
    seg._probabilities = _threshold_logits(seg)
    scan = read_scan(img)
    assert scan.orientation() == "LPS"
    mask = seg.predict(scan)
    expected = (scan.array > THRESHOLD_HU).astype(np.uint8)
    assert mask.shape == scan.shape
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("fmt", [".nii.gz", ".mha"])
def test_mask_lands_on_resampled_oblique_input(tmp_path, phantom_scan, fmt) -> None:
    """Anisotropic resampling + oblique direction: the mask still overlays the structure."""
    img, _ = phantom_scan
    image = sitk.ReadImage(str(img))
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    image.SetDirection(tuple((rot @ np.array(image.GetDirection()).reshape(3, 3)).ravel()))
    path = tmp_path / f"oblique{fmt}"
    sitk.WriteImage(image, str(path))
    ckpt = make_tiny_checkpoint(tmp_path / "c.safetensors", spacing=(2.0, 2.0, 2.0))
    seg = Segmenter(ckpt, SegmentConfig(progress=False))
    seg._probabilities = _threshold_logits(seg)
    result = seg.segment_file(path, tmp_path / "out")
    written = sitk.ReadImage(str(result.mask))
    assert written.GetSize() == image.GetSize()
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-5)
    mask = sitk.GetArrayFromImage(written) > 0
    truth = sitk.GetArrayFromImage(image) > THRESHOLD_HU
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.85, dice


def test_segment_writes_mask_volumes_preview(tmp_path, tiny_checkpoint, phantom_scan) -> None:
    img, _ = phantom_scan
    results = segment([img], tiny_checkpoint, tmp_path, SegmentConfig(progress=False, preview=True, tta=True))
    (r,) = results
    assert r.mask == tmp_path / "phantom_seg.nii.gz" and r.preview.exists()
    out = nib.load(r.mask)
    src = nib.load(img)
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert out.get_data_dtype() == np.uint8
    vols = json.loads(r.volumes.read_text())
    assert set(vols) == {"liver", "spleen", "kidney_right", "kidney_left"}
    voxel_ml = np.prod(src.header.get_zooms()) / 1000
    data = np.asarray(out.dataobj)
    assert vols["liver"] == pytest.approx((data == 1).sum() * voxel_ml, abs=1e-3)
    assert not list(tmp_path.glob(".tmp-*"))


def test_labels_filter_and_unknown_label(tmp_path, tiny_checkpoint, phantom_scan) -> None:
    img, _ = phantom_scan
    seg = Segmenter(tiny_checkpoint, SegmentConfig(progress=False, labels=["spleen"]))
    mask = seg.predict(read_scan(img))
    assert set(np.unique(mask)) <= {0, 2}
    with pytest.raises(MedvitError, match="unknown label name.*lung"):
        Segmenter(tiny_checkpoint, SegmentConfig(labels=["lung"]))


def test_card_is_readable(tiny_checkpoint) -> None:
    card = read_card(tiny_checkpoint)
    assert card.model_name == "unetr_tiny" and card.label_names()[1] == "liver"
    assert card.patch_size == (32, 32, 32) and card.preprocessing["intensity"] == "ct"


def test_real_ct_and_dicom_series(tmp_path, tiny_checkpoint, shared_data) -> None:
    results = segment(
        [shared_data / "ct" / "example_ct.nii.gz", shared_data / "ct_dicom"],
        tiny_checkpoint, tmp_path, SegmentConfig(progress=False, sw_batch_size=8),
    )
    nifti, dicom = results
    assert nib.load(nifti.mask).shape == (122, 101, 112)
    series = read_scan(shared_data / "ct_dicom")
    written = sitk.ReadImage(str(dicom.mask))
    assert written.GetSize() == (512, 512, 20)
    ref = series._itk_geometry
    np.testing.assert_allclose(written.GetOrigin(), ref.origin, atol=1e-3)
    np.testing.assert_allclose(written.GetSpacing(), ref.spacing, atol=1e-5)
    np.testing.assert_allclose(written.GetDirection(), ref.direction, atol=1e-6)


def test_real_model_when_model_space_is_the_scans_own(tmp_path) -> None:
    """RAS at the target spacing: inversion is a no-op on inference-mode tensors."""
    from medvit.pipelines.phantom import make_phantom, save_phantom

    img = tmp_path / "ras.nii.gz"
    ph = make_phantom(seed=4, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0), orientation="RAS")
    save_phantom(ph, img, tmp_path / "ras_labels.nii.gz")
    ckpt = make_tiny_checkpoint(tmp_path / "c.safetensors", spacing=(3.0, 3.0, 6.0))
    seg = Segmenter(ckpt, SegmentConfig(progress=False, labels=["liver", "spleen"]))
    scan = read_scan(img)
    mask = seg.predict(scan)
    assert mask.shape == scan.shape and set(np.unique(mask)) <= {0, 1, 2}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_label_counts_in_chunks_equal_bincount(dtype) -> None:
    mask = np.random.default_rng(0).integers(0, 300 if dtype == np.uint16 else 14, (30, 20, 17)).astype(dtype)
    expected = np.bincount(mask.ravel(), minlength=400)
    np.testing.assert_array_equal(label_counts(mask, 400, chunk=1000), expected)  # chunks end mid-array
    assert label_counts(mask, 2).sum() == mask.size  # grows past minlength to the largest id


_SEGMENT_WITHOUT_MONAI = """
import sys
from medvit.pipelines.io import read_scan
from medvit.pipelines.segment import SegmentConfig, Segmenter

for ckpt in sys.argv[2:]:
    mask = Segmenter(ckpt, SegmentConfig(progress=False)).predict(read_scan(sys.argv[1]))
    assert mask.shape == read_scan(sys.argv[1]).shape
print(sorted(m for m in sys.modules if m.split(".")[0] in ("monai", "sympy")))
"""


def test_segment_path_does_not_import_monai(tmp_path, phantom_scan) -> None:
    """MONAI's import alone costs ~300 MB and seconds; segmentation (3D and 2D models) runs
    on medvit's own stitcher and geometry, which the stitch and geometry tests hold equal
    to MONAI's."""
    img, _ = phantom_scan
    ckpt3d = make_tiny_checkpoint(tmp_path / "c3d.safetensors")
    args = dict(in_chans=3, num_classes=5, img_size=(32, 32))
    card = ModelCard("segformer_b0", args, read_card(ckpt3d).labels, {"spacing": [3.0, 3.0, 4.0], "intensity": "ct"},
                     (32, 32), {"axis": 2, "slab": 3})
    ckpt2d = save_checkpoint(medvit.create_model("segformer_b0", **args), card, tmp_path / "c2d.safetensors")
    run = subprocess.run([sys.executable, "-c", _SEGMENT_WITHOUT_MONAI, str(img), str(ckpt3d), str(ckpt2d)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


def _flip_average(
    model: torch.nn.Module, x: torch.Tensor, roi: tuple[int, int, int], dims: tuple[int, ...] = (1, 2, 3)
) -> torch.Tensor:
    """Probabilities averaged over the flips of tensor dims `dims`, each from MONAI's sliding window."""
    from monai.inferers import sliding_window_inference

    flips = [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
    probs = []
    with torch.no_grad():
        for axes in flips:
            if not set(axes) <= set(dims):
                continue
            logits = sliding_window_inference(torch.flip(x, axes)[None], roi, 1, model, overlap=0.5, mode="gaussian")
            # (K, X, Y, Z) has its spatial axes where the image (C, X, Y, Z) has them
            probs.append(torch.flip(torch.softmax(logits[0], 0), axes))
    return torch.stack(probs).mean(0)


@pytest.mark.parametrize("lateralised", [False, True])
def test_tta_is_the_average_over_the_flips(tmp_path, lateralised: bool) -> None:
    """`tta=True` returns the mean of the flipped predictions, each flipped back (fp32 path):
    all 8 flips, or the 4 that keep left and right when a label names a side of the body."""
    from monai.inferers import sliding_window_inference

    from medvit.pipelines.io import Scan

    ckpt = make_tiny_checkpoint(tmp_path / "c.safetensors", spacing=(3.0, 3.0, 4.0), seed=1)
    if not lateralised:  # the same model with labels that name no side
        model, card = load_checkpoint(ckpt)
        card.labels = {c: {"id": v["id"], "name": f"organ{c}"} for c, v in card.labels.items()}
        ckpt = save_checkpoint(model, card, tmp_path / "unsided.safetensors")
    # the scan is already in model space (RAS, the checkpoint's spacing): no resampling
    shape = (40, 32, 32)  # two windows along x
    lo, hi = -175.0, 250.0
    hu = np.random.default_rng(0).uniform(lo, hi, size=shape).astype(np.float32)
    scan = Scan(hu, np.diag([3.0, 3.0, 4.0, 1.0]), tmp_path / "ras.nii.gz")
    x = torch.from_numpy((hu - lo) / (hi - lo))[None]

    tta = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32", device="cpu", tta=True))
    plain = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32", device="cpu"))
    model = tta.model.eval()
    assert tta.tta_axes == ([1, 2] if lateralised else [0, 1, 2])
    expected = _flip_average(model, x, (32, 32, 32), (2, 3) if lateralised else (1, 2, 3))
    with torch.no_grad():
        unflipped = torch.softmax(sliding_window_inference(x[None], (32, 32, 32), 1, model, 0.5, "gaussian")[0], 0)

    got = tta.predict_proba(scan)
    assert got.shape == (5, *shape)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    without = plain.predict_proba(scan)
    torch.testing.assert_close(without, unflipped, atol=2e-5, rtol=0)
    # the random model is not flip-symmetric, so averaging over flips changes the result
    assert (without - expected).abs().max() > 1e-2
