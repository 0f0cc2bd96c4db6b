"""Export a checkpoint to ONNX or TorchScript, checked against torch before it is kept.

The exported graph takes one window as sliding-window inference feeds it, `(B, C, *patch)`
(for a 2D model `C` is the slab of neighbouring slices its card slices volumes into),
with a dynamic batch axis so `--sw-batch-size` works; the spatial size is fixed to the
card's patch size. The card is stored with the model: in the ONNX file's `metadata_props`
and in the TorchScript archive's extra files, both under the key `medvit` and as the same
JSON as a checkpoint's safetensors metadata. `medvit segment -m model.onnx` reads it back
(`medvit.pipelines.onnx_runtime`).

The export is written under a temporary name, loaded back (onnxruntime's CPU provider or
`torch.jit.load`) and run on a random window, with a batch of 3 and of 1 (the exporters
trace a batch of 2); it is renamed into place only when its logits match torch's within
the tolerance, else it is removed and the difference is reported.

ONNX uses torch's dynamo exporter (`torch.onnx.export(dynamo=True)`, which needs
onnxscript); the legacy TorchScript-based ONNX exporter fails on UNETR. TorchScript uses
`torch.jit.trace`. Every segmentation family exports both ways (tested on tiny
configurations): UNETR (ViT, Swin, PVT v2 and MiT encoders), Swin-UNETR, SegFormer 2D and
3D, TransUNet 2D and 3D, MedT and the U-Net 2D and 3D. A model that cannot be exported is
refused with one line naming it and the exporter's reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.checkpoint import CARD_KEY, ModelCard, load_checkpoint
from medvit.pipelines.errors import MedvitError, one_line, short_reason
from medvit.pipelines.segment import slice_spec

FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts")}
DEFAULT_TOLERANCE = 1e-3
EXPORT_BATCH = 2  # a batch of 1 would be specialised by the exporters; 1 and 3 are checked


@dataclass
class ExportResult:
    """What `export_onnx` / `export_torchscript` wrote.

    Attributes:
        path: The exported file.
        format: `onnx` or `torchscript`.
        model_name: The card's model.
        window: One window `(C, *patch)`, the graph's input without the batch axis.
        max_abs_diff: Largest absolute difference between the export's and torch's logits.
        logit_scale: Largest absolute logit torch gave (the tolerance scales with it above 1).
        tolerance: The tolerance it was checked against.
    """

    path: Path
    format: str
    model_name: str
    window: tuple[int, ...]
    max_abs_diff: float
    logit_scale: float
    tolerance: float

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.format}): {self.model_name}, window {self.window}, dynamic batch; "
            f"max |{self.format} - torch| logit difference {self.max_abs_diff:.2g} "
            f"(largest logit {self.logit_scale:.3g}, tolerance {self.tolerance:g})"
        )


def export_format(out_path: str | Path, fmt: str | None = None) -> str:
    """`fmt`, or the format the output's suffix names (`.onnx`; `.pt` / `.ts` for TorchScript)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise MedvitError(f"unknown export format {fmt!r} (use {' or '.join(FORMATS)})")
        return fmt
    suffix = Path(out_path).suffix.lower()
    for name, suffixes in FORMATS.items():
        if suffix in suffixes:
            return name
    raise MedvitError(f"{out_path}: cannot tell the format from the suffix; name it .onnx or .pt, or give --format")


def export_model(
    checkpoint: str | Path, out_path: str | Path, fmt: str | None = None, opset: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportResult:
    """Export to the format `fmt` names or the output's suffix implies (see `export_format`)."""
    if export_format(out_path, fmt) == "onnx":
        return export_onnx(checkpoint, out_path, opset, tolerance)
    return export_torchscript(checkpoint, out_path, tolerance)


def export_onnx(
    checkpoint: str | Path, out_path: str | Path, opset: int | None = None, tolerance: float = DEFAULT_TOLERANCE
) -> ExportResult:
    """Write the checkpoint's model as ONNX, with its card in the metadata, checked against torch.

    Args:
        checkpoint: A medvit checkpoint (.safetensors).
        out_path: The ONNX file to write.
        opset: ONNX opset (None: the exporter's default).
        tolerance: Largest logit difference allowed, times the largest logit when above 1.

    Raises:
        MedvitError: Not a checkpoint, an unwritable output, a model the exporter cannot
            export, or an export whose logits differ from torch's.
    """
    from medvit.pipelines.onnx_runtime import OnnxModel, require_onnx

    require_onnx("onnxscript", out_path)

    def save(model: torch.nn.Module, card: ModelCard, example: torch.Tensor, tmp: Path) -> None:
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), opset_version=opset, verbose=False,
        )
        program.model.metadata_props[CARD_KEY] = card.to_json()
        program.save(str(tmp), external_data=False)

    return _export(checkpoint, out_path, "onnx", save, lambda tmp: OnnxModel(tmp), tolerance)


def export_torchscript(
    checkpoint: str | Path, out_path: str | Path, tolerance: float = DEFAULT_TOLERANCE
) -> ExportResult:
    """Write the checkpoint's model as a traced TorchScript archive with the card in its extra
    files (`torch.jit.load(path, _extra_files={"medvit": ""})`), checked against torch.

    Raises:
        MedvitError: As `export_onnx`.
    """

    def save(model: torch.nn.Module, card: ModelCard, example: torch.Tensor, tmp: Path) -> None:
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={CARD_KEY: card.to_json()})

    return _export(checkpoint, out_path, "torchscript", save, lambda tmp: torch.jit.load(str(tmp)), tolerance)


Saver = Callable[[torch.nn.Module, ModelCard, torch.Tensor, Path], None]


def _export(
    checkpoint: str | Path, out_path: str | Path, fmt: str, save: Saver,
    load: Callable[[Path], Callable[[torch.Tensor], torch.Tensor]], tolerance: float,
) -> ExportResult:
    """Export with `save`, run the file `load` gives back against torch, keep it if they agree."""
    out = Path(out_path)
    _check_output(out)
    model, card = load_checkpoint(checkpoint)
    model.eval()  # what `medvit segment` runs: no dropout or stochastic depth
    slice_spec(card, model)  # the card's slicing fits the model, as `medvit segment` will need
    window = (int(model.in_chans), *(int(p) for p in card.patch_size))
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(EXPORT_BATCH, *window, generator=gen)
    check = torch.randn(3, *window, generator=gen)
    with torch.no_grad():
        reference = model(check)
    scale = float(reference.abs().max())
    result = ExportResult(out, fmt, card.model_name, window, float("nan"), scale, tolerance)

    def write(tmp: Path) -> None:
        try:
            with _quiet(), torch.no_grad():
                save(model, card, example, tmp)
        except (MemoryError, OSError):
            raise
        except Exception as e:  # whatever the exporter raises: its reason, in one line
            raise MedvitError(
                f"{checkpoint}: {card.model_name} cannot be exported to {fmt} ({exporter_reason(e)})"
            ) from None
        with _quiet(), torch.no_grad():
            exported = load(tmp)
            diff = max(
                float((exported(check) - reference).abs().max()),
                float((exported(check[:1]) - reference[:1]).abs().max()),
            )
        result.max_abs_diff = diff
        if not diff <= tolerance * max(1.0, scale):  # NaN fails too
            raise MedvitError(
                f"{out}: the {fmt} export of {card.model_name} differs from torch by {diff:.3g} on a random window "
                f"(largest logit {scale:.3g}, tolerance {tolerance:g}); nothing written"
            )

    try:
        write_atomic(out, write)
    except OSError as e:
        raise MedvitError.at(out, f"cannot be written ({e.strerror or short_reason(e)})") from None
    return result


def exporter_reason(exc: BaseException) -> str:
    """The gist of an exporter's error: torch.onnx's "Exception summary" line, else its first line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = text.split("## Exception summary", 1)
    if len(summary) == 2:
        lines = [line for line in summary[1].splitlines() if line.strip()]
        if lines:
            return short_reason(Exception(lines[0]))
    first = next((line for line in text.splitlines() if line.strip()), "")
    return short_reason(Exception(one_line(first))) if first else type(exc).__name__


def _check_output(out: Path) -> None:
    """Refuse an output that is a folder or cannot be created, before any work."""
    if out.is_dir():
        raise MedvitError(f"{out}: is a folder; give the file to write")
    probe = out.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise MedvitError(f"{out}: cannot be created ({probe} is a file)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MedvitError(f"{out}: cannot be written ({probe} is not writable)")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' progress prints and tracer warnings, kept off the user's terminal."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield
