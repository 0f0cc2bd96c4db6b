"""Checkpoints: safetensors weights with the model card in the file's metadata.

A checkpoint is never unpickled. The card (JSON under the metadata key `medvit`) holds
everything needed to rebuild and use the model: registered name and arguments, label
ids and names, preprocessing, patch size, the medvit version, and for training runs the
optimiser state file and progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import medvit
from medvit.pipelines.errors import CheckpointError

CARD_KEY = "medvit"
FORMAT_VERSION = 1


@dataclass
class ModelCard:
    """What a checkpoint says about its model.

    Attributes:
        model_name: Registered model name.
        model_args: Arguments given to `create_model` (JSON-serialisable).
        labels: Output class index (1..K) -> {"id": label id written in masks, "name": ...};
            class 0 is background.
        preprocessing: `Preprocessing.to_dict()`.
        patch_size: Sliding-window size (the model's input size; 2 entries for 2D models).
        slicing: For 2D models, how volumes are sliced: {"axis": 0|1|2, "slab": odd n}
            (see `medvit.pipelines.inference.SliceSpec`); None for 3D models.
        extra: Training progress and anything else (epoch, step, best Dice ...).
        postprocessing: Connected-component rules chosen on validation, applied to the
            masks `medvit segment` writes (`medvit.pipelines.postprocess`); None in
            checkpoints from before they existed or not made by training.
    """

    model_name: str
    model_args: dict[str, Any]
    labels: dict[int, dict[str, Any]]
    preprocessing: dict[str, Any]
    patch_size: tuple[int, ...]
    slicing: dict[str, int] | None = None
    medvit_version: str = medvit.__version__
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    postprocessing: list[dict[str, Any]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.labels) + 1

    def label_names(self) -> dict[int, str]:
        """Label id written in masks -> name (background excluded)."""
        return {int(v["id"]): str(v["name"]) for v in self.labels.values()}

    def to_json(self) -> str:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str | Path = "checkpoint") -> ModelCard:
        try:
            d = json.loads(text)
            d["labels"] = {int(k): v for k, v in d["labels"].items()}
            d["patch_size"] = tuple(d["patch_size"])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the medvit model card is unreadable ({e})") from None

    def build_model(self) -> nn.Module:
        """Create the (untrained) model the card describes."""
        try:
            return medvit.create_model(self.model_name, **self.model_args)
        except ValueError as e:
            raise CheckpointError(f"model card names a model that cannot be built: {e}") from None


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")


def save_checkpoint(model: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write weights and card to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = _atomic_target(path)
    model = getattr(model, "module", model)  # DDP wrapper
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(tensors, str(tmp), metadata={CARD_KEY: card.to_json()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_card(path: str | Path) -> ModelCard:
    """The model card of a checkpoint, without reading the weights."""
    path = Path(path)
    with _open(path) as f:
        meta = f.metadata() or {}
    if CARD_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file without a medvit model card")
    return ModelCard.from_json(meta[CARD_KEY], path)


def _open(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    # a safetensors header length may start with the byte 0x80 too; its JSON header then follows
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[8:9] != b"{"):
        raise CheckpointError(
            f"{path}: a pickle/torch.save file; medvit never unpickles checkpoints "
            "(convert it with `medvit convert`)"
        )
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:120]})") from None


@contextlib.contextmanager
def _skip_random_init() -> Iterator[None]:
    """Skip the random initialisation of parameters the checkpoint overwrites anyway.

    Initialising a ViT-B-sized model costs seconds on a CPU. Every `torch.nn.init`
    function (which modules' own `reset_parameters` call too) returns its tensor untouched
    meanwhile; buffers computed in constructors (index tables, masks) are still computed.
    """
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, ModelCard]:
    """Rebuild the model from its card and load the weights (strictly).

    Args:
        path: The checkpoint.
        device: Where the model goes.
        dtype: Cast floating-point weights to this (tensor by tensor, so a bf16 model never
            needs the fp32 weights in memory at once).

    Raises:
        CheckpointError: Not a medvit safetensors file, or weights that do not fit.
    """
    path = Path(path)
    card = read_card(path)
    default = torch.get_default_dtype()
    try:
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)  # parameters are born in the target precision
        with _skip_random_init():
            model = card.build_model()
    finally:
        torch.set_default_dtype(default)
    if dtype is not None:
        model.to(dtype)
    target = model.state_dict()
    index, data_start = _tensor_index(path)  # read_card has validated the file
    keys = set(index)
    missing, unexpected = sorted(set(target) - keys), sorted(keys - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit {card.model_name} (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for k, t in _read_tensors(path, index, data_start):
            if t.shape != target[k].shape:
                raise CheckpointError(
                    f"{path}: weights do not fit {card.model_name} ({k}: {tuple(t.shape)} in the file,"
                    f" {tuple(target[k].shape)} in the model)"
                )
            target[k].copy_(t)
    return model.to(device).eval(), card


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _tensor_index(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (name -> dtype, shape, byte range) and where the data starts."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_tensors(path: Path, index: dict[str, Any], start: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a (validated) safetensors file, read one at a time with plain reads.

    safetensors' own reader memory-maps the file, and every page it touches counts towards
    the process's resident memory until the map is closed: the whole checkpoint, on top
    of the model it is loaded into. Reading tensor by tensor keeps one tensor in flight.
    """
    with open(path, "rb") as fh:
        for key, info in sorted(index.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            fh.seek(start + begin)
            data = bytearray(fh.read(end - begin))
            dtype = _DTYPES[info["dtype"]]
            t = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            yield key, t.reshape(info["shape"])
