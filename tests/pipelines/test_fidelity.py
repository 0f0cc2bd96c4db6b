"""The exact (fp32) path equals MONAI's reference pipeline with the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medvit.pipelines.convert_weights import ConvertConfig, convert
from medvit.pipelines.io import read_scan
from medvit.pipelines.segment import SegmentConfig, Segmenter

from helpers import require

SPACING = (4.0, 4.0, 5.0)
SMALL = dict(hidden_size=96, mlp_dim=192, num_heads=4, feature_size=8)


def monai_reference(model, scan_path) -> torch.Tensor:
    """The model-zoo pipeline a user writes today, probabilities after inversion."""
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd, ScaleIntensityRanged, Spacingd,
    )

    pre = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=SPACING, mode="bilinear"),
        ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
    ])
    d = pre({"image": str(scan_path)})
    with torch.no_grad():
        logits = sliding_window_inference(d["image"][None], (32, 32, 32), 4, model, overlap=0.5, mode="gaussian")
    d["pred"] = MetaTensor(torch.softmax(logits[0], 0), meta=d["image"].meta,
                           applied_operations=d["image"].applied_operations)
    return Invertd("pred", pre, orig_keys="image", nearest_interp=False)(d)["pred"].as_tensor()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    nets = require("monai.networks.nets")
    torch.manual_seed(1)
    ref = nets.UNETR(1, 3, (32, 32, 32), **SMALL).eval()
    folder = tmp_path_factory.mktemp("fid")
    torch.save(ref.state_dict(), folder / "w.pt")
    cfg = ConvertConfig(
        source="monai", model="unetr_base", num_classes=3, img_size=(32, 32, 32), spacing=SPACING,
        model_args={"feature_size": 8, "encoder_args": {"embed_dim": 96, "num_heads": 4, "mlp_ratio": 2.0}},
    )
    ckpt, _ = convert(folder / "w.pt", folder / "c.safetensors", cfg)
    return ref, ckpt


def test_fp32_probabilities_and_masks_equal_monai(converted, phantom_scan) -> None:
    ref, ckpt = converted
    img, _ = phantom_scan  # LPS, anisotropic: exercises orientation and spacing inversion
    expected = monai_reference(ref, img)
    seg = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32", device="cpu"))
    ours = seg.predict_proba(read_scan(img))
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(0).numpy(), expected.argmax(0).numpy())


def test_bf16_path_stays_close(converted, phantom_scan) -> None:
    from medvit.pipelines.runtime import cpu_has_bf16

    if not cpu_has_bf16():
        pytest.skip("this CPU has no native bf16")
    _, ckpt = converted
    img, _ = phantom_scan
    scan = read_scan(img)
    exact = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32")).predict_proba(scan)
    fast = Segmenter(ckpt, SegmentConfig(progress=False, precision="bf16")).predict_proba(scan)
    assert (fast - exact).abs().max().item() < 0.1
    assert (fast.argmax(0) == exact.argmax(0)).float().mean().item() > 0.95
