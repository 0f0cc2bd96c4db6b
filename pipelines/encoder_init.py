"""Encoders for pretraining, and pretrained encoder weights loaded into a segmenter or classifier.

`medvit pretrain --model NAME` pretrains a registered backbone (built features-only at the
crop size), or the encoder of a registered segmenter exactly as the segmenter builds it
(UNETR's ViT without class token, Swin-UNETR's Swin), so that `medvit train --model NAME
--init-encoder RUN/last.safetensors` loads it key for key. Loading is strict: every key of
the encoder must be in the checkpoint with its shape, nothing more, the classifier's head
excepted (it stays random); a mismatch is one line naming the first key that differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from medvit.optim.param_groups import is_head
from medvit.pipelines.checkpoint import checkpoint_tensors, read_card
from medvit.pipelines.errors import MedvitError, one_line
from medvit.registry import create_model, model_kind, variant_accepts


def pretraining_encoder(
    name: str, model_args: dict[str, Any], spatial_dims: int, crop: tuple[int, ...], in_chans: int = 1
) -> tuple[nn.Module, dict[str, Any], str]:
    """The encoder to pretrain, the arguments that rebuild it, and what the weights are.

    Args:
        name: A registered backbone, or a segmenter with an `encoder` (UNETR, Swin-UNETR).
        model_args: The user's arguments (they override the ones set here).
        spatial_dims: 2 or 3.
        crop: The global view size (the model's `img_size`).
        in_chans: Input channels.

    Returns:
        `(encoder, args of create_model(name, ...), "encoder" for a segmenter's | "model")`.

    Raises:
        MedvitError: Unknown name, a video model, no 3D form, or a segmenter without an encoder.
    """
    try:
        kind = model_kind(name)
    except ValueError as e:
        raise MedvitError(one_line(str(e))) from None
    if kind == "video":
        raise MedvitError(f"{name} is a video model; pretrain an image backbone or a segmenter's encoder")
    args: dict[str, Any] = {"img_size": list(crop), "in_chans": in_chans}
    if kind != "volume":
        args["num_classes"] = 0
    if variant_accepts(name, "spatial_dims"):
        args["spatial_dims"] = spatial_dims
    elif spatial_dims == 3:
        raise MedvitError(f"{name} has no 3D form (no spatial_dims); pretrain a ViT-style backbone on volumes")
    args.update(model_args)
    args = json.loads(json.dumps(args))
    try:
        model = create_model(name, **args)
    except (ValueError, TypeError) as e:
        raise MedvitError(f"{name}: cannot be built for {spatial_dims}D views of {tuple(crop)} ({one_line(str(e))})") from None
    if kind == "volume":
        if not isinstance(getattr(model, "encoder", None), nn.Module):
            raise MedvitError(f"{name} has no separate encoder to pretrain (UNETR and Swin-UNETR have)")
        return model.encoder, args, "encoder"
    return model, args, "model"


def encoder_of(model: nn.Module) -> nn.Module:
    """What `--init-encoder` fills: a segmenter's `encoder`, or the whole backbone."""
    enc = getattr(model, "encoder", None)
    return enc if isinstance(enc, nn.Module) else model


def load_encoder(model: nn.Module, path: str | Path, keep_head: bool = False) -> dict[str, Any]:
    """Load a pretraining checkpoint's encoder weights into `model`'s encoder, strictly.

    Args:
        model: A segmenter (its `encoder` is filled) or a classifier backbone.
        path: A `medvit pretrain` checkpoint.
        keep_head: Keys of the classifier head (`head`, `head_*`) may be absent from the
            checkpoint; they keep their random initialisation.

    Returns:
        What the card says about the source: the path, model, method.

    Raises:
        MedvitError: Not a pretraining checkpoint, or weights that do not fit (one line with
            the first mismatched key and both shapes).
    """
    path = Path(path)
    card = read_card(path)
    if card.task != "pretraining":
        raise MedvitError(f"{path}: a {card.task} checkpoint; --init-encoder takes a `medvit pretrain` checkpoint")
    target = encoder_of(model).state_dict()
    tensors = dict(checkpoint_tensors(path))
    where = f"{path}: does not fit the model's encoder"
    for key in sorted(set(target) | set(tensors)):
        if key not in tensors:
            if keep_head and is_head(key, ("head",)):
                continue
            raise MedvitError(f"{where} ({key}: absent from the checkpoint, {tuple(target[key].shape)} in the model)")
        if key not in target:
            raise MedvitError(f"{where} ({key}: {tuple(tensors[key].shape)} in the checkpoint, absent from the model)")
        if tensors[key].shape != target[key].shape:
            raise MedvitError(
                f"{where} ({key}: {tuple(tensors[key].shape)} in the checkpoint, {tuple(target[key].shape)} in the model)"
            )
    with torch.no_grad():
        for key, t in tensors.items():
            target[key].copy_(t)
    return {"path": str(path), "model": card.model_name, "method": card.extra.get("method")}
