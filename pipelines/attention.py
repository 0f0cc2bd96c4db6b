"""`medvit attention`: the attention of a checkpoint's model on one input, as pictures and a table.

A segmentation checkpoint reads a scan as `medvit segment` does (`Segmenter.prepare`: the
model grid and intensities) and looks at one model window, centred on the scan's centre
or on a voxel of the scan; a classification checkpoint reads an image, volume or clip as
`medvit predict` does (`load_item`, `normalise`). The model runs once under
`capture_attention`; then

- `attention_layerNN.png`: per attention layer whose queries and keys span the input,
  the attention of the class token (or, without one, of the query at the window's focus),
  averaged over heads, over the input slice through the focus;
- `attention_rollout.png` (`rollout=True`): the same row of the attention rollout;
- `attention_distance.csv`: mean attention distance per layer and head, in input pixels
  and in mm (empty for inputs without a physical spacing: photos, clips);
- `attention_distance.png`: that distance against the layer, one dot per head (ViT, Fig. 7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from medvit.pipelines.atomic import write_csv
from medvit.pipelines.attention_figures import write_distance_plot, write_overlay
from medvit.pipelines.checkpoint import ModelCard, load_checkpoint, read_card
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.runtime import resolve_device

from medvit.analysis import attention_rollout, mean_attention_distance
from medvit.layers.attention_capture import AttentionRecord, capture_attention

DISTANCE_CSV = "attention_distance.csv"
DISTANCE_PNG = "attention_distance.png"
ROLLOUT_PNG = "attention_rollout.png"


@dataclass
class ModelInput:
    """What the model sees, and where to look.

    Attributes:
        x: The model's input `(1, C, *spatial)`.
        spacing: mm per input pixel along each spatial axis; None when not physical.
        focus: The point looked at, in input pixels (float, per spatial axis).
        slice_axis: For 3D inputs, the spatial axis the display slice is taken across.
        radiological: Show the slice as `medvit segment`'s previews (RAS model space).
    """

    x: torch.Tensor
    spacing: tuple[float, ...] | None
    focus: tuple[float, ...]
    slice_axis: int | None = None
    radiological: bool = False


@dataclass
class AttentionResult:
    """Files written and the figures behind them."""

    out_dir: Path
    records: list[AttentionRecord]
    distances: list[dict] = field(default_factory=list)
    overlays: list[Path] = field(default_factory=list)
    rollout: Path | None = None
    csv: Path | None = None
    plot: Path | None = None


def parse_at(text: str | None) -> tuple[int, int, int] | None:
    """`i,j,k` voxel indices, or None."""
    if text is None:
        return None
    try:
        ijk = tuple(int(v) for v in text.split(","))
    except ValueError:
        ijk = ()
    if len(ijk) != 3:
        raise MedvitError(f"--at must be three voxel indices i,j,k, got {text!r}")
    return ijk  # type: ignore[return-value]


def _window(image: torch.Tensor, centre: Sequence[float], size: Sequence[int]) -> tuple[torch.Tensor, list[float]]:
    """The `size` window of `image` `(C, *spatial)` around `centre`, shifted to stay inside
    (padded with the image's minimum where the image is smaller); and `centre` in it."""
    starts, pads = [], []
    for c, n, p in zip(centre, image.shape[1:], size):
        start = min(max(0, round(c) - p // 2), max(0, n - p))
        starts.append(start)
        pads.append(max(0, p - n))
    crop = image[(slice(None), *[slice(s, s + p) for s, p in zip(starts, size)])]
    if any(pads):
        crop = F.pad(crop, [v for p in reversed(pads) for v in (0, p)], value=float(image.min()))
    focus = [min(max(c - s, 0.0), p - 1.0) for c, s, p in zip(centre, starts, size)]
    return crop, focus


def segmentation_input(
    checkpoint: Path, scan_path: Path, at: tuple[int, int, int] | None, device: str
) -> tuple[torch.nn.Module, ModelInput]:
    """The model and one model-space window of the scan (`Segmenter.prepare`)."""
    from medvit.pipelines.io import read_scan
    from medvit.pipelines.segmenter import SegmentConfig, Segmenter

    seg = Segmenter(checkpoint, SegmentConfig(device=device, precision="fp32", progress=False))
    prepared = seg.prepare(read_scan(scan_path))
    image = prepared.images[0]  # (C, X, Y, Z) in model space
    shape = prepared.scan.shape
    ijk = np.asarray(at if at is not None else [(n - 1) / 2 for n in shape], dtype=float)
    if at is not None and any(not 0 <= v < n for v, n in zip(at, shape)):
        raise MedvitError.at(scan_path, f"--at {','.join(map(str, at))} is outside the scan's {shape} voxels")
    centre = (prepared.voxel_to_model @ np.append(ijk, 1.0))[:3].tolist()
    spacing = tuple(float(s) for s in seg.prep.spacing)
    if seg.slices is None:
        crop, focus = _window(image, centre, seg.card.patch_size)
        return seg.model, ModelInput(crop[None], spacing, tuple(focus), slice_axis=2, radiological=True)
    # a 2D model: the slab of slices around the focus, then the in-plane window
    axis, half = seg.slices.axis, seg.slices.slab // 2
    plane = [a for a in range(3) if a != axis]
    k = min(max(round(centre[axis]), 0), image.shape[1 + axis] - 1)
    idx = torch.arange(k - half, k + half + 1).clamp(0, image.shape[1 + axis] - 1)
    slab = image[0].index_select(axis, idx).movedim(axis, 0)  # (slab, u, v)
    crop, focus = _window(slab, [centre[a] for a in plane], seg.card.patch_size)
    return seg.model, ModelInput(crop[None], tuple(spacing[a] for a in plane), tuple(focus), radiological=True)


def classification_input(card: ModelCard, path: Path) -> ModelInput:
    """The item as `medvit predict` reads it (the card's kind, size, channels, intensity)."""
    from medvit.pipelines.classify_load import load_item, normalise

    prep = card.preprocessing
    kind = prep["kind"]
    size = tuple(card.patch_size[1:] if kind == "video" else card.patch_size)
    x = normalise(load_item(path, kind, size, prep["in_chans"], prep.get("frames"), prep.get("intensity", "auto")))
    spatial = x.shape[1:]
    focus = tuple((n - 1) / 2 for n in spatial)
    return ModelInput(x[None], None, focus, slice_axis=0 if len(spatial) == 3 else None)


def _full(rec: AttentionRecord, dims: int) -> bool:
    """Whether the record's keys tile the whole input (one sequence per input, all axes)."""
    return (
        rec.kind == "tokens"
        and rec.key_grid is not None
        and rec.query_prefix is not None
        and rec.tiled_grid is None
        and rec.probs.shape[0] == 1
        and rec.axes == tuple(range(dims))
    )


def _query_row(rec: AttentionRecord, focus: Sequence[float]) -> int | None:
    """The class token's row, or the row of the query whose cell holds `focus`."""
    if rec.query_prefix:
        return 0
    if not rec.query_grid or rec.query_stride is None:
        return None
    cell = [min(int(f // s), g - 1) for f, s, g in zip(focus, rec.query_stride, rec.query_grid)]
    return int(np.ravel_multi_index(cell, rec.query_grid))


def _row_map(rec: AttentionRecord, row: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """A row over the keys `(prefix + prod(key_grid),)` as a map on the input grid."""
    grid = row[rec.key_prefix or 0 :].reshape(rec.key_grid or ())
    return F.interpolate(grid[None, None].float(), size=tuple(spatial), mode="nearest")[0, 0]


def _plane(volume: torch.Tensor, inp: ModelInput) -> np.ndarray:
    """The display slice `(rows, cols)` of a map on the input grid."""
    if volume.ndim == 3:
        axis = inp.slice_axis or 0
        k = min(max(round(inp.focus[axis]), 0), volume.shape[axis] - 1)
        volume = volume.select(axis, k)
    plane = volume.detach().cpu().double().numpy()
    return np.ascontiguousarray(plane[::-1, ::-1].T) if inp.radiological else plane


def _focus_pixel(inp: ModelInput) -> tuple[float, float]:
    """Where the focus lies on the display slice, (row, col)."""
    f = [v for a, v in enumerate(inp.focus) if len(inp.focus) == 2 or a != inp.slice_axis]
    if inp.radiological:
        shape = [n for a, n in enumerate(inp.x.shape[2:]) if a != inp.slice_axis]
        return shape[1] - 1 - f[1], shape[0] - 1 - f[0]
    return f[0], f[1]


def _grey(inp: ModelInput) -> np.ndarray:
    """The input's display slice in 0..1 (the middle channel: a 2D slab's own slice)."""
    x = inp.x[0]
    chans = x.shape[0]
    img = _plane(x.mean(0) if chans == 3 else x[chans // 2], inp)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def _distances(records: Sequence[AttentionRecord], spacing: Sequence[float] | None) -> list[dict]:
    rows = []
    for i, rec in enumerate(records):
        if not rec.located:
            continue
        px = mean_attention_distance(rec)
        mm = mean_attention_distance(rec, spacing) if spacing is not None else None
        for h in range(px.shape[0]):
            rows.append({
                "layer": i, "name": rec.name, "head": h, "distance_px": round(float(px[h]), 4),
                "distance_mm": "" if mm is None else round(float(mm[h]), 4),
            })
    return rows


def explain(
    checkpoint: str | Path,
    input_path: str | Path,
    out_dir: str | Path,
    layers: Sequence[int] | None = None,
    rollout: bool = False,
    at: tuple[int, int, int] | None = None,
    device: str = "cpu",
) -> AttentionResult:
    """Run `checkpoint`'s model once on `input_path` and write its attention (module docstring).

    Args:
        checkpoint: A segmentation or classification checkpoint (safetensors; not ONNX).
        input_path: A scan (segmentation) or an image / volume / clip (classification).
        out_dir: Folder of the outputs (created).
        layers: Attention layers (0-based, in call order) to draw; None: every one whose
            keys span the input. The CSV always has every layer with positions.
        rollout: Also draw the attention rollout.
        at: Voxel `i,j,k` of the scan to centre the window on (segmentation only).
        device: `auto`, `cpu` or `cuda`.

    Raises:
        MedvitError: An ONNX export, an input or option that does not fit the checkpoint,
            a model without attention, or no layer with positions.
    """
    checkpoint, input_path, out = Path(checkpoint), Path(input_path), Path(out_dir)
    if checkpoint.suffix.lower() == ".onnx":
        raise MedvitError.at(checkpoint, "an ONNX export hides its attention; use the safetensors checkpoint")
    card = read_card(checkpoint)
    if card.task == "classification":
        if at is not None:
            raise MedvitError("--at picks a voxel of a scan; it applies to segmentation checkpoints only")
        model, card = load_checkpoint(checkpoint, resolve_device(device))
        inp = classification_input(card, input_path)
    else:
        model, inp = segmentation_input(checkpoint, input_path, at, device)
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad(), capture_attention(model) as records:
        model(inp.x.to(dev))
    if not records:
        raise MedvitError.at(checkpoint, f"{card.model_name} has no attention layers (a CNN or MLP model)")
    result = AttentionResult(out, records)
    dims = inp.x.ndim - 2
    spatial = inp.x.shape[2:]
    drawable = [i for i, r in enumerate(records) if _full(r, dims) and _query_row(r, inp.focus) is not None]
    chosen = drawable if layers is None else list(layers)
    bad = [i for i in chosen if i not in drawable]
    if bad:
        raise MedvitError(
            f"--layer {bad[0]}: not a layer whose keys span the input; {card.model_name} has "
            f"{len(records)} attention layers, drawable: {', '.join(map(str, drawable)) or 'none'}"
        )
    grey, focus_px = _grey(inp), _focus_pixel(inp)
    for i in chosen:
        rec = records[i]
        row = _query_row(rec, inp.focus)
        heat = _plane(_row_map(rec, rec.probs[0, :, row].mean(0), spatial), inp)
        who = "class token" if rec.query_prefix else "centre query"
        mark = None if rec.query_prefix else focus_px
        result.overlays.append(
            write_overlay(out / f"attention_layer{i:02d}.png", grey, heat, f"layer {i} {rec.name}: {who}", mark)
        )
    if rollout:
        square = [r for r in records if _full(r, dims) and r.probs.shape[-1] == r.probs.shape[-2]]
        if not square:
            raise MedvitError(f"--rollout: {card.model_name} has no self-attention over the whole input")
        chain = [r for r in square if r.probs.shape == square[0].probs.shape]
        roll = attention_rollout(chain)
        row = _query_row(chain[0], inp.focus)
        heat = _plane(_row_map(chain[0], roll[0, row], spatial), inp)
        mark = None if chain[0].query_prefix else focus_px
        result.rollout = write_overlay(out / ROLLOUT_PNG, grey, heat, f"rollout of {len(chain)} layers", mark)
    result.distances = _distances(records, inp.spacing)
    if not result.distances:
        raise MedvitError(f"{card.model_name}: no attention layer has token positions, so no attention distance")
    columns = ["layer", "name", "head", "distance_px", "distance_mm"]
    result.csv = write_csv(out / DISTANCE_CSV, columns, result.distances)
    unit = "mm" if inp.spacing is not None else "px"
    result.plot = write_distance_plot(
        out / DISTANCE_PNG,
        [(r["layer"], float(r[f"distance_{unit}"])) for r in result.distances],
        f"mean attention distance ({unit})",
    )
    return result
