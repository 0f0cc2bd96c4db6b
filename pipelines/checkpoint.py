"""Checkpoints: safetensors weights with the model card in the file's metadata.

A checkpoint is never unpickled. The card (JSON under the metadata key `medvit`) holds
everything needed to rebuild and use the model: registered name and arguments, label
ids and names, preprocessing, patch size, the medvit version, and for training runs the
optimiser state file and progress.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import medvit
from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.errors import CheckpointError, MedvitError, short_reason
from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW, Preprocessing

CARD_KEY = "medvit"
FORMAT_VERSION = 1


@dataclass
class ModelCard:
    """What a checkpoint says about its model.

    Attributes:
        model_name: Registered model name.
        model_args: Arguments given to `create_model` (JSON-serialisable).
        labels: Segmentation: output class index (1..K) -> {"id": label id written in masks,
            "name": ...}; class 0 is background. Classification: output index (0..K-1) ->
            {"id": the same index, "name": class name}.
        preprocessing: Segmentation: `Preprocessing.to_dict()`. Classification: how inputs
            are read (`medvit.pipelines.classify_data`): {"kind": "image"|"volume"|"video",
            "in_chans": C, "intensity": ...}.
        patch_size: Sliding-window size (the model's input size; 2 entries for 2D models);
            for classification the input size ((H, W), (D, H, W) or (T, H, W)).
        slicing: For 2D models, how volumes are sliced: {"axis": 0|1|2, "slab": odd n}
            (see `medvit.pipelines.slicing.SliceSpec`); None for 3D models.
        extra: Training progress and anything else (epoch, step, best Dice ...). A
            training run's cards hold its split under ``"split"``: ``{"fold": K, "all" or
            null (a held-out fraction), "folds": the number of cross-validation folds or
            null, "val": [validation case ids]}`` (absent in cards from before it existed).
        postprocessing: Connected-component rules chosen on validation, applied to the
            masks `medvit segment` writes (`medvit.pipelines.postprocess`); None in
            checkpoints from before they existed or not made by training.
        task: `segmentation` (masks; `medvit segment`), `classification` (class
            probabilities; `medvit predict`) or `pretraining` (a self-supervised encoder,
            `medvit pretrain`: no labels; `model_name` / `model_args` name the backbone, or
            the segmenter whose `encoder` the weights are when `extra["weights"]` is
            `"encoder"`; `extra["method"]` and `extra["hyper_parameters"]` the method).
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
    task: str = "segmentation"

    @property
    def num_classes(self) -> int:
        """Model outputs: the labels and background (segmentation), or the classes."""
        return len(self.labels) + (self.task == "segmentation")

    def label_names(self) -> dict[int, str]:
        """Label id written in masks -> name (background excluded); class index -> name."""
        return {int(v["id"]): str(v["name"]) for v in self.labels.values()}

    def class_names(self) -> list[str]:
        """The names of the model's outputs in output order (labels, without background)."""
        return [str(self.labels[i]["name"]) for i in sorted(self.labels)]

    def to_json(self) -> str:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, path: str | Path = "checkpoint") -> ModelCard:
        """Parse and check a card: every field must have the type and range the pipelines rely on.

        Raises:
            CheckpointError: Not JSON, a field missing, unknown, or of the wrong type or range.
        """
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: the medvit model card is not JSON ({short_reason(e)})") from None
        problem = _card_problem(d)
        if problem:
            raise CheckpointError(f"{path}: the medvit model card is unreadable ({problem})")
        d["labels"] = {int(k): v for k, v in d["labels"].items()}
        d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)

    def build_model(self, path: str | Path | None = None) -> nn.Module:
        """Create the (untrained) model the card describes.

        Args:
            path: The checkpoint the card came from, named in errors.
        """
        try:
            model = medvit.create_model(self.model_name, **self.model_args)
            if self.task == "pretraining" and self.extra.get("weights") == "encoder":
                return model.encoder
            return model
        except MemoryError:
            raise
        except Exception as e:  # unknown arguments, impossible sizes: whatever the constructor says
            where = f"{path}: " if path is not None else ""
            raise CheckpointError(f"{where}model card names a model that cannot be built: {short_reason(e)}") from None


_CARD_REQUIRED = {"model_name", "model_args", "labels", "preprocessing", "patch_size"}
_CARD_OPTIONAL = {"slicing", "medvit_version", "format_version", "extra", "postprocessing", "task"}
TASKS = ("segmentation", "classification", "pretraining")
_AXIS_PAIRS = ("LR", "AP", "IS")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _labels_problem(labels: Any, task: str = "segmentation") -> str | None:
    if not isinstance(labels, dict) or not labels:
        return "labels must be a non-empty object"
    first = 1 if task == "segmentation" else 0
    try:
        indices = sorted(int(k) for k in labels)
    except (TypeError, ValueError):
        return f"label keys must be class indices {first}..K"
    if indices != list(range(first, len(labels) + first)) or len(set(labels)) != len(indices):
        return f"label keys must be the class indices {first}..{len(labels) - 1 + first}, got {sorted(labels)[:5]}"
    if task == "classification":
        if len(labels) < 2 or any(
            not isinstance(e, dict) or e.get("id") != int(k) or not isinstance(e.get("name"), str)
            for k, e in labels.items()
        ):
            return "classes must be at least 2 of {\"id\": their index, \"name\": string}"
        return None
    ids = []
    for entry in labels.values():
        if not isinstance(entry, dict) or not _is_int(entry.get("id")) or not isinstance(entry.get("name"), str):
            return "each label must be {\"id\": integer, \"name\": string}"
        ids.append(entry["id"])
    if len(set(ids)) != len(ids) or min(ids) < 1 or max(ids) > 65535:
        return "label ids must be distinct integers from 1 to 65535"
    return None


def _preprocessing_problem(prep: Any) -> str | None:
    if not isinstance(prep, dict):
        return "preprocessing must be an object"
    spacing = prep.get("spacing")
    if spacing is not None and not (
        isinstance(spacing, list) and len(spacing) == 3 and all(_is_number(v) and v > 0 for v in spacing)
    ):
        return "preprocessing spacing must be three positive numbers or null"
    window = prep.get("ct_window", list(DEFAULT_CT_WINDOW))
    if not (isinstance(window, list) and len(window) == 2 and all(_is_number(v) for v in window)
            and window[0] < window[1]):  # fmt: skip
        return "preprocessing ct_window must be two increasing numbers"
    orientation = prep.get("orientation", "RAS")
    if not (isinstance(orientation, str) and len(orientation) == 3
            and sorted(next((i for i, pair in enumerate(_AXIS_PAIRS) if c in pair), 9) for c in orientation)
            == [0, 1, 2]):  # fmt: skip
        return f"preprocessing orientation must be three axis codes such as RAS, got {orientation!r}"
    try:
        Preprocessing.from_dict(prep)
    except Exception as e:
        return short_reason(e)
    return None


def _rule_ok(rule: Any) -> bool:
    if not isinstance(rule, dict) or not _is_int(rule.get("id")) or rule.get("rule") not in ("largest", "min_ml"):
        return False
    return rule["rule"] == "largest" or (_is_number(rule.get("min_ml")) and rule["min_ml"] >= 0)


def _split_ok(split: Any) -> bool:
    if not isinstance(split, dict) or not {"fold", "folds", "val"} <= set(split):
        return False
    fold, folds, val = split["fold"], split["folds"], split["val"]
    return (
        (fold is None or fold == "all" or (_is_int(fold) and fold >= 0))
        and (folds is None or (_is_int(folds) and folds >= 1))
        and isinstance(val, list) and all(isinstance(c, str) for c in val)
    )


def _card_problem(d: Any) -> str | None:
    """What is wrong with a parsed card, or None."""
    if not isinstance(d, dict):
        return "not a JSON object"
    missing, unknown = _CARD_REQUIRED - set(d), set(d) - _CARD_REQUIRED - _CARD_OPTIONAL
    if missing:
        return f"missing {', '.join(sorted(missing))}"
    if unknown:
        return f"unknown fields {', '.join(sorted(unknown))}"
    if not isinstance(d["model_name"], str) or not d["model_name"]:
        return "model_name must be a string"
    if not isinstance(d["model_args"], dict):
        return "model_args must be an object"
    patch = d["patch_size"]
    if not (isinstance(patch, list) and len(patch) in (2, 3) and all(_is_int(v) and 0 < v <= 4096 for v in patch)):
        return f"patch_size must be 2 or 3 positive integers, got {patch!r}"
    slicing = d.get("slicing")
    if slicing is not None and not (
        isinstance(slicing, dict) and set(slicing) == {"axis", "slab"} and slicing["axis"] in (0, 1, 2)
        and _is_int(slicing["axis"]) and _is_int(slicing["slab"]) and slicing["slab"] >= 1 and slicing["slab"] % 2
    ):  # fmt: skip
        return "slicing must be null or {\"axis\": 0|1|2, \"slab\": odd integer}"
    if not isinstance(d.get("medvit_version", ""), str):
        return "medvit_version must be a string"
    version = d.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        return "format_version must be a positive integer"
    if version > FORMAT_VERSION:
        return f"format {version} was written by a newer medvit (this one reads format {FORMAT_VERSION})"
    if not isinstance(d.get("extra", {}), dict):
        return "extra must be an object"
    if not _split_ok(d.get("extra", {}).get("split", {"fold": None, "folds": None, "val": []})):
        return "extra split must be {\"fold\": index|\"all\"|null, \"folds\": integer|null, \"val\": [case ids]}"
    post = d.get("postprocessing")
    if post is not None and not (isinstance(post, list) and all(_rule_ok(r) for r in post)):
        return "postprocessing must be null or a list of {\"id\", \"rule\": \"largest\"|\"min_ml\", \"min_ml\"}"
    task = d.get("task", "segmentation")
    if task not in TASKS:
        return f"task must be one of {', '.join(TASKS)}, got {task!r}"
    if task == "classification":
        return _labels_problem(d["labels"], task) or _classify_prep_problem(d["preprocessing"], d["patch_size"])
    if task == "pretraining":
        return _pretraining_problem(d)
    return _labels_problem(d["labels"]) or _preprocessing_problem(d["preprocessing"])


def _pretraining_problem(d: dict[str, Any]) -> str | None:
    if d["labels"] != {}:
        return "a pretraining checkpoint has no labels"
    if not isinstance(d.get("extra", {}).get("method"), str):
        return "a pretraining card must name its method in extra"
    if d.get("extra", {}).get("weights", "model") not in ("model", "encoder"):
        return "extra weights must be \"model\" or \"encoder\""
    prep = d["preprocessing"]
    if isinstance(prep, dict) and prep.get("kind") == "image":  # pretrained on 2D images
        return _classify_prep_problem(prep, d["patch_size"])
    return _preprocessing_problem(prep)


def _classify_prep_problem(prep: Any, size: list) -> str | None:
    if not isinstance(prep, dict) or prep.get("kind") not in ("image", "volume", "video"):
        return "classification preprocessing must name its kind: image, volume or video"
    if len(size) != (2 if prep["kind"] == "image" else 3):
        return f"a {prep['kind']} classifier's input size must have {2 if prep['kind'] == 'image' else 3} entries"
    if not _is_int(prep.get("in_chans")) or not 1 <= prep["in_chans"] <= 16:
        return "classification preprocessing in_chans must be an integer from 1 to 16"
    return None


_TASK_USE = {"segmentation": "segment scans with medvit segment", "classification": "classify with medvit predict"}


def require_task(card: ModelCard, path: str | Path, task: str) -> None:
    """Refuse a checkpoint made for another task than `task` in one line saying what to do with it.

    Raises:
        MedvitError: The card's task is not `task` (a pretraining checkpoint holds an encoder only).
    """
    if card.task == task:
        return
    if card.task == "pretraining":
        raise MedvitError(f"{path}: a pretraining checkpoint (an encoder, no head); fine-tune it first with "
                          "medvit train --init-encoder")  # fmt: skip
    raise MedvitError(f"{path}: a {card.task} checkpoint ({card.num_classes} classes), not a {task} one; "
                      f"{_TASK_USE.get(card.task, 'use the command made for it')}")  # fmt: skip


def save_checkpoint(model: nn.Module, card: ModelCard, path: str | Path) -> Path:
    """Write weights and card to `path` atomically (temporary file, then rename)."""
    path = Path(path)
    model = getattr(model, "module", model)  # DDP wrapper
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={CARD_KEY: card.to_json()}))


def read_card(path: str | Path) -> ModelCard:
    """The model card of a checkpoint (or of an exported `.onnx` model), without reading the weights."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from medvit.pipelines.onnx_runtime import read_onnx_card

        return read_onnx_card(path)
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
    index, data_start = _tensor_index(path)
    default = torch.get_default_dtype()
    try:
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)  # parameters are born in the target precision
        with _skip_random_init():
            model = card.build_model(path=path)
    finally:
        torch.set_default_dtype(default)
    if dtype is not None:
        model.to(dtype)
    target = model.state_dict()
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


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Any, ModelCard]:
    """A model to segment with and its card: a checkpoint (`load_checkpoint`), or an exported
    `.onnx` model run by onnxruntime in fp32 (`medvit.pipelines.onnx_runtime`; `dtype` must
    then be None or float32)."""
    if Path(path).suffix.lower() == ".onnx":
        from medvit.pipelines.onnx_runtime import load_onnx

        if dtype not in (None, torch.float32):
            raise MedvitError(f"{path}: ONNX models run in fp32 only, not {dtype}")
        return load_onnx(path, device)
    return load_checkpoint(path, device, dtype)


def model_precision(paths: str | Path | Sequence[str | Path], precision: str) -> str:
    """The precision models run in when asked for `precision`: as asked for checkpoints;
    fp32 when any of `paths` is an ONNX model (those refuse bf16 and fp16)."""
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        if Path(path).suffix.lower() == ".onnx":
            from medvit.pipelines.onnx_runtime import onnx_precision

            return onnx_precision(path, precision)
    return precision


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


_ITEM_SIZES = {name: torch.empty(0, dtype=dt).element_size() for name, dt in _DTYPES.items()}


def _tensor_index(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors header (name -> dtype, shape, byte range) and where the data starts.

    Raises:
        CheckpointError: A header that does not describe tensors this loader can read
            within the file (safetensors checks most of this too; its rules differ
            between versions, the reader here relies on these).
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > file_size - 8:
                raise ValueError(f"header length {size} beyond the file's {file_size} bytes")
            header = json.loads(fh.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({short_reason(e)})") from None
    header.pop("__metadata__", None)
    data_size = file_size - 8 - size
    for key, info in header.items():
        problem = _entry_problem(info, data_size)
        if problem:
            raise CheckpointError(f"{path}: tensor {key!r} in the header is unusable ({problem})")
    return header, 8 + size


def _entry_problem(info: Any, data_size: int) -> str | None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        return "expected dtype, shape and data_offsets"
    if info["dtype"] not in _DTYPES:
        return f"unsupported dtype {info['dtype']!r}"
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        return f"invalid shape {shape!r}"
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size):  # fmt: skip
        return f"data_offsets {offsets!r} outside the {data_size} bytes of data"
    if offsets[1] - offsets[0] != math.prod(shape) * _ITEM_SIZES[info["dtype"]]:
        return f"data_offsets {offsets!r} do not hold a {info['dtype']} tensor of shape {shape}"
    return None


def checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a checkpoint, read one at a time after checking its header.

    Raises:
        CheckpointError: Not a safetensors file this loader can read.
    """
    path = Path(path)
    read_card(path)  # a checkpoint with a card, and never a pickle
    index, start = _tensor_index(path)
    return _read_tensors(path, index, start)


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
