"""Segment scans: preprocessing, sliding-window inference, inversion, export.

Every mask is written on its scan's own grid: predictions are made in the model's space
(RAS, target spacing, MONAI transforms) and mapped back through the affine those
transforms produced. Inference and inversion stream (`medvit.pipelines.stitch`), so memory
stays bounded on large scans; with `precision="fp32"` the probabilities are MONAI's
sliding-window + `Invertd` result.

A batch survives bad scans: each is reported and the others are segmented. Every output
is written under a temporary name and renamed, and `<stem>_volumes.json` is written last
(after removing an older one), so a scan is finished exactly when its volumes file
exists; `skip_existing` resumes a killed batch from there.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medvit.pipelines.atomic import remove_temporaries, write_json
from medvit.pipelines.checkpoint import ModelCard, load_model, model_precision
from medvit.pipelines.errors import MedvitError, one_line
from medvit.pipelines.geometry import model_grid, resample_scan
from medvit.pipelines.intensity import scale_intensity
from medvit.pipelines.io import Scan, find_scans, read_scan, scan_stem, write_mask
from medvit.pipelines.postprocess import apply_postprocessing
from medvit.pipelines.preprocessing import Preprocessing
from medvit.pipelines.preview import write_preview
from medvit.pipelines.recipes import is_lateralised, left_right_axis
from medvit.pipelines.runtime import autocast, inference_dtype, resolve_device, return_freed_memory
from medvit.pipelines.slicing import SliceSpec
from medvit.pipelines.stitch import (
    accumulator_device,
    invert_argmax,
    invert_probabilities,
    stream_probabilities,
    stream_slice_probabilities,
)


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
        tta: Average the predictions over the flips of the three axes (8), or of the two that
            keep left and right (4) when a label names a side of the body.
        labels: Keep only these label names (others become background).
        preview: Also write `<stem>_preview.png`.
        progress: Show progress bars.
        skip_existing: Leave out scans already finished in the output folder (their
            `<stem>_seg.nii.gz` and `<stem>_volumes.json` exist, and with `preview` their
            `<stem>_preview.png`).
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
    skip_existing: bool = False
    postprocess: str = "auto"


@dataclass
class SegmentResult:
    """What was written for one input (`skipped`: found finished, left as it was)."""

    input: Path
    mask: Path
    volumes: Path
    volumes_ml: dict[str, float]
    preview: Path | None = None
    skipped: bool = False


@dataclass
class ScanFailure:
    """A scan a batch could not segment; `problem` is one line starting with the scan."""

    input: Path
    problem: str

    def __str__(self) -> str:
        return self.problem


class BatchError(MedvitError):
    """Some scans of a batch failed; every other scan was segmented.

    `str()` is a one-line summary (the failure itself when the batch was one scan);
    `details` holds one line per failed scan.
    """

    def __init__(self, failures: list[ScanFailure], results: list[SegmentResult], out_dir: Path) -> None:
        self.failures, self.results = failures, results
        total = len(failures) + len(results)
        if total == 1:
            super().__init__(failures[0].problem)
            self.details: list[str] = []
        else:
            super().__init__(
                f"{len(failures)} of {total} scans failed (listed above); the other {len(results)} are in {out_dir}"
            )
            self.details = [f.problem for f in failures]


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
        self.dtype = inference_dtype(self.device, model_precision(checkpoint, self.config.precision))
        # bf16 on a CPU: weights and activations in bf16 (norm statistics accumulate in
        # fp32); autocast would cast every activation back and forth, which costs more
        # than it saves there
        self.native_dtype = self.dtype == torch.bfloat16 and self.device.type == "cpu"
        self.model, self.card = load_model(checkpoint, self.device, torch.bfloat16 if self.native_dtype else None)
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
        dims = [1 + a for a in self.tta_axes]
        flips = [()] if not self.config.tta else [
            axes for n in range(len(dims) + 1) for axes in itertools.combinations(dims, n)
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

    @property
    def tta_axes(self) -> list[int]:
        """Model-space axes `--tta` flips: all three, but never left-right when a label is
        lateralised: the mirror image of a left kidney is a right kidney, so its prediction
        flipped back would put the right kidney's label on the left one."""
        axes = [0, 1, 2]
        if any(is_lateralised(name) for name in self.card.label_names().values()):
            axes.remove(left_right_axis(self.prep.orientation))
        return axes

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

    @property
    def label_names(self) -> dict[int, str]:
        """Label id -> name of the labels this segmenter writes (after `labels` filtering)."""
        ids = self.class_ids.tolist()
        return {lid: name for lid, name in self.card.label_names().items() if self.keep[ids.index(lid)]}

    def volumes_ml(self, mask: np.ndarray, scan: Scan) -> dict[str, float]:
        voxel_ml = float(np.prod(scan.spacing)) / 1000.0
        names = self.label_names
        counts = label_counts(mask, max(names) + 1 if names else 1)
        return {name: round(float(counts[lid]) * voxel_ml, 3) for lid, name in names.items()}

    def segment_file(self, path: str | Path, out_dir: str | Path) -> SegmentResult:
        """Segment one scan into `out_dir`; its volumes file, written last, marks it finished."""
        scan = read_scan(path)
        mask = self.predict(scan)
        out_dir = Path(out_dir)
        vol_target = out_dir / f"{scan.stem}_volumes.json"
        # An older volumes file would mark the scan finished while its new mask is written.
        vol_target.unlink(missing_ok=True)
        mask_path = write_mask(mask, scan, out_dir / f"{scan.stem}_seg.nii.gz")
        vols = self.volumes_ml(mask, scan)
        preview = None
        if self.config.preview:
            preview = write_preview(
                scan.array, mask, scan.affine, out_dir / f"{scan.stem}_preview.png", self.label_names
            )
        vol_path = write_json(vol_target, vols)
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


def segment(
    inputs: Sequence[str | Path],
    checkpoint: str | Path,
    out_dir: str | Path,
    config: SegmentConfig | None = None,
    on_result: Callable[[SegmentResult], None] | None = None,
) -> list[SegmentResult]:
    """Segment every scan named by `inputs` (files, DICOM folders, folders of scans).

    A bad scan (missing, unreadable, not 3D, non-finite, failing to segment or to be
    written) does not stop the batch: it is recorded and the next scan goes on. Two
    scans whose outputs would share a name are a failure of the later one. The model is
    loaded when the first scan needs it.

    Args:
        inputs: Scan files and folders as the user gave them.
        checkpoint: The model.
        out_dir: Output folder, created if needed.
        config: Options; `skip_existing` resumes a killed batch.
        on_result: Called with each scan's result as soon as it is written (or skipped).

    Returns:
        The results of all scans, in input order, when every scan succeeded.

    Raises:
        MedvitError: The output folder, checkpoint or settings are unusable; raised
            before any scan is segmented.
        BatchError: After the whole batch, when some scans failed.
    """
    config = config or SegmentConfig()
    out = Path(out_dir)
    failures: list[ScanFailure] = []
    paths = _expand_inputs(inputs, failures)
    _check_output_folder(out)
    results: list[SegmentResult] = []
    seg: Segmenter | None = None
    for path in tqdm(paths, desc="scans", disable=not config.progress or len(paths) < 2):
        stem = scan_stem(path)
        _remove_temporaries(out, stem)
        done = _finished(out, path, config.preview) if config.skip_existing else None
        if done is not None:
            results.append(done)
        else:
            if seg is None:
                seg = Segmenter(checkpoint, config)  # a bad checkpoint or setting fails the whole batch
            try:
                results.append(seg.segment_file(path, out))
            except (MedvitError, MemoryError, torch.OutOfMemoryError) as exc:
                failures.append(ScanFailure(path, _problem_line(path, exc)))
                return_freed_memory()
                continue
        if on_result is not None:
            on_result(results[-1])
    if failures:
        raise BatchError(failures, results, out)
    return results


def _expand_inputs(inputs: Sequence[str | Path], failures: list[ScanFailure]) -> list[Path]:
    """The scans named by each input; an input that names none is a failure."""
    paths: list[Path] = []
    seen: set[Path] = set()
    owners: dict[str, Path] = {}
    for raw in inputs:
        try:
            found = find_scans([raw])
        except MedvitError as exc:
            failures.append(ScanFailure(Path(raw), _problem_line(Path(raw), exc)))
            continue
        for path in found:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            stem = scan_stem(path)
            if stem in owners:
                failures.append(ScanFailure(path, (
                    f"{path}: its outputs ({stem}_seg.nii.gz ...) would overwrite those of {owners[stem]}; "
                    "segment it into another folder"
                )))  # fmt: skip
                continue
            owners[stem] = path
            paths.append(path)
    return paths


def _check_output_folder(out: Path) -> None:
    """Refuse an output folder that cannot be made or written, before any work."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "exists and is not a folder" if probe == out else f"cannot be created ({probe} is a file)"
        raise MedvitError(f"{out}: output folder {where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MedvitError(f"{out}: output folder is not writable")


def _remove_temporaries(out: Path, stem: str) -> None:
    """Temporary files of this scan's outputs left by a killed run (SIGKILL runs no clean-up)."""
    if not out.is_dir():
        return
    for suffix in ("_seg.nii.gz", "_volumes.json", "_preview.png"):
        remove_temporaries(out / f"{stem}{suffix}")


def _finished(out: Path, path: Path, preview: bool) -> SegmentResult | None:
    """The result of a scan finished by an earlier run, or None when it must be (re)done."""
    stem = scan_stem(path)
    mask, vols, png = out / f"{stem}_seg.nii.gz", out / f"{stem}_volumes.json", out / f"{stem}_preview.png"
    if not mask.is_file() or not vols.is_file() or (preview and not png.is_file()):
        return None
    try:
        volumes = json.loads(vols.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(volumes, dict):
        return None
    return SegmentResult(path, mask, vols, volumes, png if preview else None, skipped=True)


def _problem_line(path: Path, exc: BaseException) -> str:
    text = one_line(str(exc))
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        text = f"out of memory ({text})" if text else "out of memory"
    return text if text.startswith(str(path)) else f"{path}: {text}"


def card_summary(card: ModelCard) -> str:
    names = ", ".join(card.label_names().values())
    slicing = ""
    if card.slicing:
        axis = {0: "sagittal", 1: "coronal", 2: "axial"}.get(card.slicing["axis"], card.slicing["axis"])
        slicing = f", 2D on {axis} slices (slab {card.slicing['slab']})"
    return f"{card.model_name} ({card.num_classes - 1} labels: {names}), patch {card.patch_size}{slicing}"
