"""Convert MONAI- or timm-trained weights into a medvit checkpoint (`medvit convert`).

The source file is read without unpickling code: safetensors, or a torch file through
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers. MONAI
is not imported: the weights are mapped by `medvit.convert`, which is pure PyTorch.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

import medvit
from medvit.convert import load_monai, load_timm
from medvit.pipelines.checkpoint import ModelCard, save_checkpoint
from medvit.pipelines.errors import CheckpointError, MedvitError
from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW, DEFAULT_SPACING, Preprocessing

SOURCES = ("monai", "timm")
# Keys under which training scripts commonly nest the weights.
_NESTED = ("state_dict", "model", "model_state_dict", "network_weights", "net", "module")


@dataclass
class ConvertConfig:
    """Options of `medvit convert`.

    Attributes:
        source: `monai` or `timm`.
        model: Registered medvit model name with the same architecture.
        model_args: Further `create_model` arguments (e.g. `encoder_args` for a UNETR
            trained with another width).
        num_classes: Output classes (background included for segmentation).
        in_chans: Input channels.
        img_size: Model input (sliding-window) size; None keeps the model's default.
        spacing: Target spacing of the preprocessing the weights were trained with.
        intensity: Intensity preset (`ct`, `mr`, `none`).
        labels: Names of classes 1..num_classes-1 (default `label_1`, ...).
        ct_window: HU window of the `ct` preset.
    """

    source: str
    model: str
    model_args: dict[str, Any] | None = None
    num_classes: int | None = None
    in_chans: int | None = None
    img_size: Sequence[int] | None = None
    spacing: Sequence[float] | None = DEFAULT_SPACING
    intensity: str = "ct"
    labels: Sequence[str] | None = None
    ct_window: Sequence[float] = DEFAULT_CT_WINDOW


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: holds objects other than tensors, refused (weights_only loading: {str(e).splitlines()[0][:100]})"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable weights file ({str(e).splitlines()[0][:120]})") from None
    for key in _NESTED:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: no state dict of tensors found")
    return obj


def convert(weights: str | Path, out: str | Path, config: ConvertConfig) -> tuple[Path, ModelCard]:
    """Load foreign weights into the named medvit model and save it with a model card.

    Raises:
        MedvitError: Unknown source or model, or weights that do not fit the model.
    """
    if config.source not in SOURCES:
        raise MedvitError(f"--from must be one of {SOURCES}, got {config.source!r}")
    state = read_weights(weights)
    args: dict[str, Any] = dict(config.model_args or {})
    if config.num_classes is not None:
        args["num_classes"] = int(config.num_classes)
    if config.in_chans is not None:
        args["in_chans"] = int(config.in_chans)
    if config.img_size is not None:
        args["img_size"] = [int(s) for s in config.img_size]
    try:
        model = medvit.create_model(config.model, **args)
    except ValueError as e:
        raise MedvitError(str(e)) from None
    try:
        (load_monai if config.source == "monai" else load_timm)(model, state)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    num_classes = int(getattr(model, "num_classes", 0))
    names = list(config.labels or [f"label_{i}" for i in range(1, num_classes)])
    if len(names) != max(num_classes - 1, 0):
        raise MedvitError(f"--labels names {len(names)} classes, the model has {num_classes - 1} besides background")
    prep = Preprocessing(
        spacing=tuple(config.spacing) if config.spacing else None,
        intensity=config.intensity,
        ct_window=tuple(config.ct_window),
    )
    patch = tuple(getattr(model, "img_size", ()) or ())
    card = ModelCard(
        model_name=config.model,
        model_args=_jsonable(args),
        labels={i: {"id": i, "name": n} for i, n in enumerate(names, start=1)},
        preprocessing=prep.to_dict(),
        patch_size=patch,
        extra={"converted_from": config.source, "source_file": Path(weights).name},
    )
    return save_checkpoint(model, card, out), card


def _jsonable(args: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
