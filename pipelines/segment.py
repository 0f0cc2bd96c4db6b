"""Segment scans: preprocessing, MONAI sliding-window inference, inversion, export.

Every mask is written on its scan's own grid: predictions are made in the model's space
(RAS, target spacing) and mapped back with MONAI's inversion of exactly the spatial
transforms that were applied.
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
from monai.transforms import Invertd
from tqdm.auto import tqdm

from medvit.pipelines.checkpoint import ModelCard, load_checkpoint
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.inference import SliceSpec, window_logits
from medvit.pipelines.io import Scan, find_scans, read_scan, write_mask
from medvit.pipelines.preview import write_preview
from medvit.pipelines.runtime import autocast, inference_dtype, resolve_device
from medvit.pipelines.transforms import Preprocessing, preprocess_transforms


@dataclass
class SegmentConfig:
    """Options of `medvit segment`.

    Attributes:
        overlap: Sliding-window overlap fraction.
        sw_batch_size: Windows per forward pass.
        device: `auto`, `cpu` or `cuda`.
        precision: `auto` (fp16 on CUDA, bf16 on CPUs with native bf16, else fp32),
            `fp32` (the exact path: probabilities equal MONAI's), `bf16` or `fp16`.
        tta: Average the predictions over the 8 flips of the three axes.
        labels: Keep only these label names (others become background).
        preview: Also write `<stem>_preview.png`.
        progress: Show progress bars.
    """

    overlap: float = 0.5
    sw_batch_size: int = 4
    device: str = "auto"
    precision: str = "auto"
    tta: bool = False
    labels: Sequence[str] | None = None
    preview: bool = False
    progress: bool = True


@dataclass
class SegmentResult:
    """What was written for one input."""

    input: Path
    mask: Path
    volumes: Path
    volumes_ml: dict[str, float]
    preview: Path | None = None


class Segmenter:
    """A loaded checkpoint that turns scans into masks on their own grids."""

    def __init__(self, checkpoint: str | Path, config: SegmentConfig | None = None) -> None:
        self.config = config or SegmentConfig()
        if not 0.0 <= self.config.overlap < 1.0:
            raise MedvitError(f"--overlap must be in [0, 1), got {self.config.overlap}")
        if self.config.sw_batch_size < 1:
            raise MedvitError(f"--sw-batch-size must be >= 1, got {self.config.sw_batch_size}")
        self.device = resolve_device(self.config.device)
        self.dtype = inference_dtype(self.device, self.config.precision)
        self.model, self.card = load_checkpoint(checkpoint, self.device)
        self.prep = Preprocessing.from_dict(self.card.preprocessing)
        self.transform = preprocess_transforms(self.prep, keys=("image",))
        self.class_ids = np.array([0] + [int(self.card.labels[c]["id"]) for c in sorted(self.card.labels)])
        self.keep = self._kept_classes(self.config.labels)
        self.slices = slice_spec(self.card, self.model)

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

    @torch.inference_mode()
    def _logits(self, image: torch.Tensor) -> torch.Tensor:
        x = image.as_tensor()[None].to(self.device) if hasattr(image, "as_tensor") else image[None].to(self.device)
        flips = [()] if not self.config.tta else [
            axes for n in range(4) for axes in itertools.combinations((2, 3, 4), n)
        ]
        total = None
        for axes in flips:
            xi = torch.flip(x, axes) if axes else x
            with autocast(self.device, True, self.dtype):
                out = window_logits(
                    self.model, xi, self.card.patch_size, self.config.sw_batch_size, self.config.overlap,
                    slices=self.slices, progress=self.config.progress and not self.config.tta,
                )
            prob = torch.softmax(out.float(), dim=1)
            prob = torch.flip(prob, axes) if axes else prob
            total = prob if total is None else total + prob
        return (total / len(flips))[0].cpu()

    def predict_proba(self, scan: Scan) -> torch.Tensor:
        """Class probabilities `(C, *scan.shape)` on the scan's own grid."""
        data = self.transform({"image": scan})
        image = data["image"]
        if any(s < 1 for s in image.shape[1:]):
            raise MedvitError(f"{scan.path}: empty after resampling")
        prob = self._logits(image)
        pred = image.clone()  # keeps the meta data and applied operations
        pred.set_array(prob)
        data["pred"] = pred
        inverted = Invertd("pred", self.transform, orig_keys="image", nearest_interp=False)(data)["pred"]
        prob = inverted.as_tensor() if hasattr(inverted, "as_tensor") else torch.as_tensor(inverted)
        if tuple(prob.shape[1:]) != scan.shape:
            raise RuntimeError(f"inversion gave {tuple(prob.shape[1:])}, expected {scan.shape}")
        return prob

    def predict(self, scan: Scan) -> np.ndarray:
        """The label-id mask of a scan, on the scan's own grid."""
        prob = self.predict_proba(scan)
        kept = np.flatnonzero(self.keep)
        classes = kept[prob[torch.from_numpy(kept)].argmax(0).numpy()]
        return self.class_ids[classes]

    def volumes_ml(self, mask: np.ndarray, scan: Scan) -> dict[str, float]:
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        names = self.card.label_names()
        counts = np.bincount(mask.ravel(), minlength=max(names) + 1 if names else 1)
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
