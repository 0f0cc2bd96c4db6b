"""Segment scans: preprocessing, sliding-window inference, inversion, export.

Every mask is written on its scan's own grid: predictions are made in the model's space
(RAS, target spacing, MONAI transforms) and mapped back through the affine those
transforms produced. Inference and inversion stream (`medvit.pipelines.stitch`), so memory
stays bounded on large scans; with `precision="fp32"` the probabilities are MONAI's
sliding-window + `Invertd` result.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medvit.pipelines.checkpoint import ModelCard, load_checkpoint
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.inference import SliceSpec
from medvit.pipelines.io import Scan, find_scans, read_scan, write_mask
from medvit.pipelines.preview import write_preview
from medvit.pipelines.runtime import autocast, inference_dtype, resolve_device, return_freed_memory
from medvit.pipelines.stitch import (
    accumulator_device,
    invert_argmax,
    invert_probabilities,
    stream_probabilities,
    stream_slice_probabilities,
)
from medvit.pipelines.geometry import model_grid, resample_scan, scale_intensity
from medvit.pipelines.postprocess import apply_postprocessing
from medvit.pipelines.preprocessing import Preprocessing


@dataclass
class SegmentConfig:
    """Options of `medvit segment`.

    Attributes:
        overlap: Sliding-window overlap fraction.
        sw_batch_size: Windows per forward pass; None = 1 on the CPU (a 96^3 UNETR-B window
            alone keeps the cores busy, and larger batches are slower per window there and
            hold several windows' activations), 4 on CUDA.
        device: `auto`, `cpu` or `cuda`.
        precision: `auto` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32),
            `fp32` (the exact path: probabilities equal MONAI's), `bf16` or `fp16`.
        tta: Average the predictions over the 8 flips of the three axes.
        labels: Keep only these label names (others become background).
        preview: Also write `<stem>_preview.png`.
        progress: Show progress bars.
        postprocess: `auto` applies the connected-component rules in the checkpoint's card
            (chosen on validation by `medvit train`), `none` writes the raw argmax mask.
    """

    overlap: float = 0.5
    sw_batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    tta: bool = False
    labels: Sequence[str] | None = None
    preview: bool = False
    progress: bool = True
    postprocess: str = "auto"


@dataclass
class SegmentResult:
    """What was written for one input."""

    input: Path
    mask: Path
    volumes: Path
    volumes_ml: dict[str, float]
    preview: Path | None = None


def label_counts(mask: np.ndarray, minlength: int, chunk: int = 2**23) -> np.ndarray:
    """Voxels per label id, counted a chunk at a time: `np.bincount` widens its input to
    int64, which on a 512x512x400 mask is an 840 MB temporary (the run's peak)."""
    flat = mask.reshape(-1)
    counts = np.zeros(minlength, dtype=np.int64)
    for start in range(0, flat.size, chunk):
        part = np.bincount(flat[start : start + chunk], minlength=counts.size)
        if part.size > counts.size:  # an id above minlength: widen what is counted so far
            counts = np.pad(counts, (0, part.size - counts.size))
        counts += part
    return counts


class Segmenter:
    """A loaded checkpoint that turns scans into masks on their own grids."""

    def __init__(self, checkpoint: str | Path, config: SegmentConfig | None = None) -> None:
        self.config = config or SegmentConfig()
        if not 0.0 <= self.config.overlap < 1.0:
            raise MedvitError(f"--overlap must be in [0, 1), got {self.config.overlap}")
        if self.config.sw_batch_size is not None and self.config.sw_batch_size < 1:
            raise MedvitError(f"--sw-batch-size must be >= 1, got {self.config.sw_batch_size}")
        if self.config.postprocess not in ("auto", "none"):
            raise MedvitError(f"--postprocess must be auto or none, got {self.config.postprocess!r}")
        self.device = resolve_device(self.config.device)
        self.sw_batch_size = self.config.sw_batch_size or (4 if self.device.type == "cuda" else 1)
        self.dtype = inference_dtype(self.device, self.config.precision)
        # bf16 on a CPU: weights and activations in bf16 (norm statistics accumulate in
        # fp32); autocast would cast every activation back and forth, which costs more
        # than it saves there
        self.native_dtype = self.dtype == torch.bfloat16 and self.device.type == "cpu"
        self.model, self.card = load_checkpoint(checkpoint, self.device, torch.bfloat16 if self.native_dtype else None)
        self.prep = Preprocessing.from_dict(self.card.preprocessing)
        ids = [0] + [int(self.card.labels[c]["id"]) for c in sorted(self.card.labels)]
        self.class_ids = np.array(ids, dtype=np.uint8 if max(ids) < 256 else np.uint16)
        self.keep = self._kept_classes(self.config.labels)
        self.slices = slice_spec(self.card, self.model)
        return_freed_memory()

    def _kept_classes(self, names: Sequence[str] | None) -> np.ndarray:
        classes = sorted(self.card.labels)
        if not names:
            return np.ones(len(classes) + 1, dtype=bool)
        known = {self.card.labels[c]["name"]: c for c in classes}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise MedvitError(
                f"unknown label name(s) {', '.join(unknown)}; the checkpoint has {', '.join(known)}"
            )
        keep = np.zeros(len(classes) + 1, dtype=bool)
        keep[0] = True
        for n in names:
            keep[known[n]] = True
        return keep

    def _model_space(self, scan: Scan) -> tuple[torch.Tensor, np.ndarray]:
        """The preprocessed volume `(C, X, Y, Z)` and the map from scan voxels to its voxels.

        The grid and values are those of `preprocess_transforms` (MONAI's Orientationd,
        Spacingd, intensity presets; tested equal), computed without importing MONAI.
        """
        affine, shape = model_grid(scan.affine, scan.shape, self.prep.spacing, self.prep.orientation)
        if any(s < 1 for s in shape):
            raise MedvitError(f"{scan.path}: empty after resampling")
        norm = self.prep.ct_norm() if self.prep.intensity == "ct-fingerprint" else None
        image = scale_intensity(resample_scan(scan.array, affine, scan.affine, shape), self.prep.intensity,
                                self.prep.ct_window, norm)
        return image, np.linalg.solve(affine, np.asarray(scan.affine, dtype=float))

    @property
    def store_dtype(self) -> torch.dtype:
        """Model-space probabilities are kept in fp16 unless this is the exact (fp32) path."""
        return torch.float32 if self.dtype == torch.float32 else torch.float16

    def _predictor(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_dtype:
            return self.model(x.to(self.dtype))
        with autocast(self.device, True, self.dtype):
            return self.model(x)

    @torch.inference_mode()
    def _probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Model-space class probabilities `(K, X, Y, Z)` on the CPU (averaged over flips with TTA)."""
        x = image.to(self.device)
        flips = [()] if not self.config.tta else [
            axes for n in range(4) for axes in itertools.combinations((1, 2, 3), n)
        ]
        total = None
        for axes in flips:
            xi = torch.flip(x, axes) if axes else x
            prob = self._stream(xi, progress=self.config.progress and not self.config.tta)
            prob = torch.flip(prob, axes) if axes else prob
            total = prob if total is None else total.add_(prob)
        if len(flips) > 1:
            total /= len(flips)
        return total

    def _stream(self, x: torch.Tensor, progress: bool) -> torch.Tensor:
        k = self.card.num_classes
        if self.slices is not None:
            return stream_slice_probabilities(
                self._predictor, x, self.card.patch_size, k, self.slices, self.sw_batch_size,
                self.config.overlap, self.store_dtype, progress,
            )
        return stream_probabilities(
            self._predictor, x, self.card.patch_size, k, self.sw_batch_size, self.config.overlap,
            self.store_dtype, accumulate_on=accumulator_device(x, k, self.card.patch_size), progress=progress,
        )

    def predict_proba(self, scan: Scan) -> torch.Tensor:
        """Class probabilities `(C, *scan.shape)` float32 on the scan's own grid."""
        image, voxel_to_model = self._model_space(scan)
        return invert_probabilities(self._probabilities(image), voxel_to_model, scan.shape)

    def predict(self, scan: Scan) -> np.ndarray:
        """The label-id mask of a scan, on the scan's own grid (computed slab by slab)."""
        image, voxel_to_model = self._model_space(scan)
        return_freed_memory()
        prob = self._probabilities(image)
        del image
        return_freed_memory()
        classes = invert_argmax(prob, voxel_to_model, scan.shape, self.keep)
        mask = self.class_ids[classes]
        if self.config.postprocess == "auto":
            apply_postprocessing(mask, self.card.postprocessing, scan.spacing)
        return mask

    def volumes_ml(self, mask: np.ndarray, scan: Scan) -> dict[str, float]:
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        names = self.card.label_names()
        counts = label_counts(mask, max(names) + 1 if names else 1)
        return {
            name: round(float(counts[lid]) * voxel_ml, 3)
            for lid, name in names.items()
            if self.keep[self.class_ids.tolist().index(lid)]
        }

    def segment_file(self, path: str | Path, out_dir: str | Path) -> SegmentResult:
        scan = read_scan(path)
        mask = self.predict(scan)
        out_dir = Path(out_dir)
        mask_path = write_mask(mask, scan, out_dir / f"{scan.stem}_seg.nii.gz")
        vols = self.volumes_ml(mask, scan)
        vol_path = _write_json(out_dir / f"{scan.stem}_volumes.json", vols)
        preview = None
        if self.config.preview:
            preview = write_preview(scan.array, mask, scan.affine, out_dir / f"{scan.stem}_preview.png")
        return SegmentResult(Path(path), mask_path, vol_path, vols, preview)


def slice_spec(card: ModelCard, model: torch.nn.Module) -> SliceSpec | None:
    """How a 2D model slices volumes (None for 3D models); checks the card fits the model."""
    dims = getattr(model, "spatial_dims", len(card.patch_size))
    if dims == 3:
        return None
    if dims != 2 or len(card.patch_size) != 2:
        raise MedvitError(f"{card.model_name}: a {dims}D model with patch size {card.patch_size} cannot segment volumes")
    spec = SliceSpec(**card.slicing) if card.slicing else SliceSpec(2, getattr(model, "in_chans", 1))
    if spec.slab != getattr(model, "in_chans", spec.slab):
        raise MedvitError(f"{card.model_name}: slab of {spec.slab} slices but the model takes {model.in_chans} channels")
    return spec


def _write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{secrets.token_hex(4)}-{path.name}")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def segment(
    inputs: Sequence[str | Path], checkpoint: str | Path, out_dir: str | Path, config: SegmentConfig | None = None
) -> list[SegmentResult]:
    """Segment every scan named by `inputs` (files, DICOM folders, folders of scans).

    All inputs are checked before any model work starts, so a typo fails fast.
    """
    paths = find_scans(inputs)
    seg = Segmenter(checkpoint, config)
    results = []
    for path in tqdm(paths, desc="scans", disable=not seg.config.progress or len(paths) < 2):
        results.append(seg.segment_file(path, out_dir))
    return results


def card_summary(card: ModelCard) -> str:
    names = ", ".join(card.label_names().values())
    slicing = ""
    if card.slicing:
        axis = {0: "sagittal", 1: "coronal", 2: "axial"}.get(card.slicing["axis"], card.slicing["axis"])
        slicing = f", 2D on {axis} slices (slab {card.slicing['slab']})"
    return f"{card.model_name} ({card.num_classes - 1} labels: {names}), patch {card.patch_size}{slicing}"
