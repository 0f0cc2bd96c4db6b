"""Exported ONNX models as segmenters: an onnxruntime session behind the model interface.

`medvit export` stores the model card in the ONNX file's `metadata_props` (key `medvit`,
the same JSON as a checkpoint's safetensors metadata), so an ONNX file carries everything
`medvit segment` needs: preprocessing, labels, patch size and slicing. An ONNX file holds
a graph of standard operators and its weights (protobuf); reading one runs no Python code.
ONNX models always run in fp32.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from medvit.pipelines.checkpoint import CARD_KEY, ModelCard
from medvit.pipelines.errors import CheckpointError, MedvitError, short_reason

ONNX_SUFFIX = ".onnx"
_INSTALL = "pip install 'medvit[onnx]'"


def is_onnx(path: str | Path) -> bool:
    """Whether `path` names an ONNX model (by its suffix)."""
    return Path(path).suffix.lower() == ONNX_SUFFIX


def require_onnx(module: str, path: str | Path) -> ModuleType:
    """Import `onnx` / `onnxruntime`, or a one-line error saying how to install them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MedvitError(f"{path}: ONNX models need {module} ({_INSTALL})") from None


def onnx_precision(path: str | Path, precision: str) -> str:
    """The precision an ONNX model runs in: fp32 (`auto` included); bf16 and fp16 are refused."""
    if precision in ("auto", "fp32"):
        return "fp32"
    raise MedvitError(f"{path}: ONNX models run in fp32 only; leave out --precision {precision} or give fp32")


def read_onnx_card(path: str | Path) -> ModelCard:
    """The model card an ONNX file carries in its metadata.

    Raises:
        CheckpointError: Missing, not an ONNX file, or without a (valid) medvit card.
    """
    path = Path(path)
    onnx = require_onnx("onnx", path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX model" if not path.exists() else f"{path}: not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise CheckpointError.at(path, f"not an ONNX file ({short_reason(e)})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if CARD_KEY not in meta:
        raise CheckpointError(f"{path}: an ONNX file without a medvit model card (make it with `medvit export`)")
    return ModelCard.from_json(meta[CARD_KEY], path)


class OnnxModel:
    """An onnxruntime session that takes and returns torch tensors, as the segmenter's model.

    Attributes:
        spatial_dims: 2 or 3, from the graph's input rank.
        in_chans: Input channels, from the graph's input.
        window: The fixed spatial size of the graph's input (None entries where dynamic).
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        path = Path(path)
        ort = require_onnx("onnxruntime", path)
        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as torch would (OMP_NUM_THREADS)
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as e:  # onnxruntime's own error types
            raise CheckpointError.at(path, f"onnxruntime cannot load it ({short_reason(e)})") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1 or len(inputs[0].shape) not in (4, 5):
            raise CheckpointError(f"{path}: expected one (batch, channels, *window) input with 2 or 3 spatial axes")
        shape = inputs[0].shape
        if not isinstance(shape[1], int):
            raise CheckpointError(f"{path}: the input's channel axis has no fixed size")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.spatial_dims = len(shape) - 2
        self.in_chans = int(shape[1])
        self.window = tuple(s if isinstance(s, int) else None for s in shape[2:])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, K, *window)` of windows `(B, C, *window)`, on `x`'s device."""
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: feed})
        return torch.from_numpy(out).to(x.device)

    def eval(self) -> OnnxModel:
        return self

    def to(self, *args: Any, **kwargs: Any) -> OnnxModel:
        return self


def load_onnx(path: str | Path, device: torch.device | str = "cpu") -> tuple[OnnxModel, ModelCard]:
    """An exported model and its card; the graph's window must be the card's patch size.

    Raises:
        CheckpointError: Not a medvit ONNX export, or a graph that does not fit its card.
    """
    card = read_onnx_card(path)
    model = OnnxModel(path, device)
    if model.window != tuple(card.patch_size):
        raise CheckpointError(
            f"{path}: the graph takes windows of {model.window}, its card says patch size {card.patch_size}"
        )
    return model, card
