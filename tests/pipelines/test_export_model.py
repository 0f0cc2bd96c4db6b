"""ONNX and TorchScript exports: logits equal torch's, the card travels with the model, and
every refusal is one line with nothing left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from medvit.pipelines.checkpoint import (
    ModelCard, load_checkpoint, load_model, model_precision, read_card, save_checkpoint,
)
from medvit.pipelines.errors import CheckpointError, MedvitError
from medvit.pipelines.export_model import export_format, export_onnx, export_torchscript, exporter_reason
from medvit.pipelines.onnx_runtime import OnnxModel, load_onnx
from medvit.registry import create_model
from tiny_configs import tiny_overrides


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    export_onnx(tiny_checkpoint, out)
    return out


def _window(card: ModelCard, model: torch.nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, model.in_chans, *card.patch_size, generator=torch.Generator().manual_seed(7))


def test_onnx_logits_and_card_match_the_checkpoint(tiny_onnx, tiny_checkpoint) -> None:
    model, card = load_checkpoint(tiny_checkpoint)
    session, onnx_card = load_model(tiny_onnx, "cpu")
    assert isinstance(session, OnnxModel)
    assert (session.spatial_dims, session.in_chans, session.window) == (3, 1, (32, 32, 32))
    assert onnx_card == card  # read back from the ONNX metadata, field by field
    proto = onnx.load(str(tiny_onnx))
    assert ModelCard.from_json({p.key: p.value for p in proto.metadata_props}["medvit"]) == card
    for batch in (1, 2, 4):  # the batch axis is dynamic
        x = _window(card, model, batch)
        with torch.no_grad():
            expected = model(x)
        got = session(x)
        assert got.shape == expected.shape == (batch, card.num_classes, 32, 32, 32)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # a non-contiguous window (the sliding window permutes axes) gives the same logits
    x = _window(card, model, 1).transpose(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(session(x), model(x), atol=1e-4, rtol=1e-4)


def test_torchscript_logits_and_card_match_the_checkpoint(tmp_path, tiny_checkpoint) -> None:
    result = export_torchscript(tiny_checkpoint, tmp_path / "tiny.pt")
    assert result.format == "torchscript" and 0 < result.max_abs_diff < 1e-4 and result.window == (1, 32, 32, 32)
    model, card = load_checkpoint(tiny_checkpoint)
    extra = {"medvit": ""}
    with pytest.warns(FutureWarning):  # TorchScript is deprecated in torch; loading it says so
        scripted = torch.jit.load(str(tmp_path / "tiny.pt"), _extra_files=extra)
    assert ModelCard.from_json(extra["medvit"]) == card
    x = _window(card, model, 3)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.pt"]


def _family_checkpoint(path: Path, name: str, **card_args) -> Path:
    torch.manual_seed(0)
    args = {**tiny_overrides(name), "num_classes": 3, **card_args.pop("model_args", {})}
    model = create_model(name, **args)
    size = args.get("img_size", 32)
    patch = tuple(size) if isinstance(size, (list, tuple)) else (size,) * model.spatial_dims
    card = ModelCard(
        model_name=name, model_args=args, labels={1: {"id": 1, "name": "liver"}, 2: {"id": 2, "name": "spleen"}},
        preprocessing={"spacing": [2.0, 2.0, 2.0], "intensity": "ct"}, patch_size=patch, **card_args,
    )
    return save_checkpoint(model, card, path)


# 2D models see slabs of neighbouring slices as channels
_SLAB3 = {"model_args": {"in_chans": 3}, "slicing": {"axis": 2, "slab": 3}}
FAMILIES = [
    pytest.param("unet_nnunet_2d", _SLAB3, id="unet_nnunet_2d"),
    pytest.param("unet_nnunet_3d", {}, id="unet_nnunet_3d"),
    pytest.param("segformer3d_b0", {}, id="segformer3d_b0", marks=pytest.mark.slow),
    pytest.param("segformer_b0", _SLAB3, id="segformer_b0", marks=pytest.mark.slow),
    pytest.param("swin_unetr_small", {}, id="swin_unetr_small", marks=pytest.mark.slow),
    pytest.param("unetr_swin_tiny", {}, id="unetr_swin_tiny", marks=pytest.mark.slow),
    pytest.param("unetr_mit_b0", {}, id="unetr_mit_b0", marks=pytest.mark.slow),
    pytest.param("transunet_r50_vit_b16", {}, id="transunet_r50_vit_b16", marks=pytest.mark.slow),
    pytest.param("transunet3d_r50_vit_b16", {}, id="transunet3d_r50_vit_b16", marks=pytest.mark.slow),
    pytest.param("medt", {}, id="medt", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, card_args", FAMILIES)
def test_segmentation_families_export_with_torch_logits(tmp_path, name, card_args) -> None:
    ckpt = _family_checkpoint(tmp_path / f"{name}.safetensors", name, **dict(card_args))
    model, card = load_checkpoint(ckpt)
    x = _window(card, model, 2)
    with torch.no_grad():
        expected = model(x)
    result = export_onnx(ckpt, tmp_path / f"{name}.onnx")
    assert result.window == (model.in_chans, *card.patch_size)
    assert result.max_abs_diff < 1e-4, result.summary()
    session, onnx_card = load_onnx(tmp_path / f"{name}.onnx")
    assert onnx_card == card and session.spatial_dims == model.spatial_dims
    torch.testing.assert_close(session(x), expected, atol=1e-4, rtol=1e-4)
    result = export_torchscript(ckpt, tmp_path / f"{name}.pt")
    assert result.max_abs_diff < 1e-4, result.summary()


def test_an_export_that_differs_from_torch_is_refused_and_removed(tmp_path, tiny_checkpoint) -> None:
    out = tmp_path / "tiny.pt"
    with pytest.raises(MedvitError, match=r"differs from torch by [0-9.e-]+ .*tolerance 1e-09\); nothing written"):
        export_torchscript(tiny_checkpoint, out, tolerance=1e-9)
    assert list(tmp_path.iterdir()) == []


def test_export_refusals_are_one_line(tmp_path, tiny_checkpoint, monkeypatch) -> None:
    not_ckpt = tmp_path / "notes.safetensors"
    not_ckpt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        export_onnx(not_ckpt, tmp_path / "a.onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MedvitError, match=r"cannot be created \(.*file is a file\)"):
        export_onnx(tiny_checkpoint, tmp_path / "file" / "a.onnx")
    with pytest.raises(MedvitError, match="is a folder"):
        export_torchscript(tiny_checkpoint, tmp_path)
    with pytest.raises(MedvitError, match="cannot tell the format"):
        export_format(tmp_path / "a.safetensors")
    assert export_format(tmp_path / "a.PT") == "torchscript" and export_format("x.bin", "onnx") == "onnx"

    def broken_exporter(*args, **kwargs):
        raise RuntimeError(
            "Failed to decompose the FX graph for ONNX compatibility. \x1b[96mThis is step 2/3\x1b[0m\n- Create an "
            "issue\n\n## Exception summary\n\n<class 'ValueError'>: Cannot view a tensor with shape [2, 3]\n\nmore"
        )

    monkeypatch.setattr(torch.onnx, "export", broken_exporter)
    with pytest.raises(MedvitError) as err:
        export_onnx(tiny_checkpoint, tmp_path / "b.onnx")
    assert str(err.value) == (
        f"{tiny_checkpoint}: unetr_tiny cannot be exported to onnx (<class 'ValueError'>: Cannot view a tensor "
        "with shape [2, 3])"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes.safetensors"]
    assert exporter_reason(ValueError("first line\nsecond")) == "first line"


def test_onnx_files_without_a_card_or_not_onnx_are_refused(tmp_path, tiny_onnx) -> None:
    proto = onnx.load(str(tiny_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(CheckpointError, match="bare.onnx: an ONNX file without a medvit model card"):
        read_card(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="junk.onnx: not an ONNX file"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(CheckpointError, match="no such ONNX model"):
        read_card(tmp_path / "missing.onnx")
    with pytest.raises(MedvitError, match="fp32 only"):
        load_model(tiny_onnx, "cpu", torch.bfloat16)
    # one ONNX model among several checkpoints makes the whole run fp32
    assert model_precision([tiny_onnx.with_suffix(".safetensors"), tiny_onnx], "auto") == "fp32"
    assert model_precision(tiny_onnx.with_suffix(".safetensors"), "bf16") == "bf16"
    with pytest.raises(MedvitError, match=r"tiny.onnx: ONNX models run in fp32 only; leave out --precision fp16"):
        model_precision([tiny_onnx], "fp16")
