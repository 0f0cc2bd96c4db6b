"""Checkpoints that cannot be trusted: refused by name before anything large is allocated."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from helpers import TINY_UNETR_ARGS
from medvit.pipelines.checkpoint import CARD_KEY, CheckpointError, load_checkpoint, read_card


def _parts(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _write(path: Path, header: dict[str, Any], data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _with_card(tiny_checkpoint: Path, path: Path, **changes: Any) -> Path:
    header, data = _parts(tiny_checkpoint)
    card = json.loads(header["__metadata__"][CARD_KEY])
    card.update(changes)
    header["__metadata__"][CARD_KEY] = json.dumps(card)
    return _write(path, header, data)


def _refused(path: Path, fragment: str, load: bool = False) -> None:
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path) if load else read_card(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"labels": {"1": {"id": 1, "name": "liver"}, "3": {"id": 3, "name": "x"}}}, "class indices 1..2"),
        ({"labels": {"1": {"id": "1", "name": "liver"}}}, "each label must be"),
        ({"labels": {"1": {"id": 1, "name": "a"}, "2": {"id": 1, "name": "b"}}}, "label ids must be distinct"),
        ({"patch_size": [32, 32.5, 32]}, "patch_size must be 2 or 3 positive integers"),
        ({"slicing": {"axis": 3, "slab": 1}}, "slicing must be null"),
        ({"preprocessing": {"spacing": [1, 1, float("inf")]}}, "preprocessing spacing must be three positive numbers"),
        ({"preprocessing": {"intensity": "pet"}}, "intensity preset must be one of"),
        ({"preprocessing": {"orientation": "RRS"}}, "preprocessing orientation must be three axis codes"),
        ({"model_args": ["img_size"]}, "model_args must be an object"),
        ({"format_version": 99}, "written by a newer medvit"),
        ({"surprise": 1}, "unknown fields surprise"),
        ({"extra": {"split": {"fold": -1, "folds": 5, "val": []}}}, "extra split must be"),
        ({"extra": {"split": {"fold": 0, "folds": 5, "val": "case_000"}}}, "extra split must be"),
    ],
)
def test_card_fields_of_the_wrong_type_or_range(
    tmp_path: Path, tiny_checkpoint: Path, changes: dict[str, Any], fragment: str
) -> None:
    _refused(_with_card(tiny_checkpoint, tmp_path / "card.safetensors", **changes), fragment)


def test_card_for_another_model_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    wider = {**TINY_UNETR_ARGS, "encoder_args": {"embed_dim": 64, "depth": 3, "num_heads": 2}}
    path = _with_card(tiny_checkpoint, tmp_path / "wider.safetensors", model_args=wider)
    _refused(path, "weights do not fit unetr_tiny", load=True)
    path = _with_card(tiny_checkpoint, tmp_path / "args.safetensors", model_args={**TINY_UNETR_ARGS, "bogus": 1})
    _refused(path, "model card names a model that cannot be built", load=True)


@pytest.mark.parametrize(("dtype", "per_item"), [("U16", 2), ("F8_E4M3", 4), ("I8", 4)])
def test_tensor_dtypes_this_loader_does_not_read(tmp_path: Path, tiny_checkpoint: Path, dtype: str, per_item: int) -> None:
    """Same bytes, another dtype: a valid safetensors file, but weights medvit cannot (or must not) load."""
    header, data = _parts(tiny_checkpoint)
    key = next(k for k in sorted(header) if k != "__metadata__" and header[k]["dtype"] == "F32")
    header[key].update(dtype=dtype, shape=[*header[key]["shape"], per_item])
    path = _write(tmp_path / "entry.safetensors", header, data)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    expected = "weights do not fit" if dtype == "I8" else f"tensor {key!r} in the header is unusable (unsupported dtype"
    assert expected in message or "not a safetensors file" in message, message


def test_header_length_beyond_the_file(tmp_path: Path, tiny_checkpoint: Path) -> None:
    raw = tiny_checkpoint.read_bytes()
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) * 10) + raw[8:])
    _refused(path, "not a safetensors file")
