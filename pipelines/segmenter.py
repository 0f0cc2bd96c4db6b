"""A loaded model, or an ensemble of several, that turns scans into masks on their own grids.

Every mask is written on its scan's own grid: predictions are made in the model's space
(RAS, target spacing, MONAI transforms) and mapped back through the affine those
transforms produced. Inference and inversion stream (`medvit.pipelines.stitch`), so memory
stays bounded on large scans; with `precision="fp32"` the probabilities are MONAI's
sliding-window + `Invertd` result. An ensemble averages its members' probabilities in
model space. The mask is written as NIfTI (`<stem>_seg.nii.gz`), as a DICOM Segmentation
object referencing the source series (`<stem>_seg.dcm`, for DICOM series inputs;
`medvit.pipelines.dicom_seg`), or both (`output_type`); `<stem>_volumes.json` is written
last (after removing an older one), so a scan is finished exactly when it exists.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medvit.pipelines.atomic import write_json
from medvit.pipelines.body import body_box, body_mask, body_mask_low, head_foot_axis, window_box
from medvit.pipelines.checkpoint import ModelCard, load_model, model_precision, require_task
from medvit.pipelines.dicom_seg import check_dicom_seg_input, read_seg_sources, write_dicom_seg
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.geometry import model_grid, resample_scan
from medvit.pipelines.intensity import scale_intensity
from medvit.pipelines.io import Scan, read_scan, write_mask
from medvit.pipelines.postprocess import apply_postprocessing
from medvit.pipelines.preprocessing import Preprocessing
from medvit.pipelines.preview import write_preview
from medvit.pipelines.recipes import is_lateralised, left_right_axis
from medvit.pipelines.runtime import (
    autocast,
    inference_dtype,
    local_device,
    resolve_device,
    return_freed_memory,
)
from medvit.pipelines.slicing import SliceSpec
from medvit.pipelines.statistics import STATS_SUFFIX, label_statistics, statistics_payload, voxel_volume_ml
from medvit.pipelines.stitch import (
    Placed,
    accumulator_device,
    invert_argmax,
    invert_probabilities,
    stream_probabilities,
    stream_slice_probabilities,
    window_runs,
    window_starts,
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
        statistics: Also write `<stem>_stats.json`: per label, voxels, volume and the scan's
            intensities inside it (mean, std, min, max, percentiles; HU for CT models).
        progress: Show progress bars.
        skip_existing: Leave out scans already finished in the output folder (their
            `<stem>_volumes.json` and the masks `output_type` asks for exist, and with
            `preview` their `<stem>_preview.png`, with `statistics` their `<stem>_stats.json`).
        prefetch: Read and preprocess the next scan of a batch while the model runs on
            the current one (holds one more scan in memory). None: when the model runs on
            CUDA, where the CPU is free for it; on the CPU both stages compete for the same
            cores and the overlap measured slower (`benchmarks/bench_batch.py`).
        postprocess: `auto` applies the connected-component rules in the checkpoint's card
            (chosen on validation by `medvit train`), `none` writes the raw argmax mask.
        body_crop: `auto` runs the windows only over the box of the model grid that holds the
            body (`medvit.pipelines.body`; CT models, whose inputs are in HU), background
            outside it; `none` runs them over the whole grid.
        output_type: `nifti` writes `<stem>_seg.nii.gz`; `dicom-seg` writes `<stem>_seg.dcm`,
            a DICOM Segmentation object of the source series (DICOM series inputs only);
            `both` writes both.
    """

    overlap: float = 0.5
    sw_batch_size: int | None = None
    device: str = "auto"
    precision: str = "auto"
    tta: bool = False
    labels: Sequence[str] | None = None
    preview: bool = False
    statistics: bool = False
    progress: bool = True
    skip_existing: bool = False
    postprocess: str = "auto"
    prefetch: bool | None = None
    output_type: str = "nifti"
    body_crop: str = "auto"


OUTPUT_TYPES = ("nifti", "dicom-seg", "both")


def mask_outputs(output_type: str) -> tuple[bool, bool]:
    """Whether `output_type` writes the NIfTI mask, and the DICOM SEG."""
    if output_type not in OUTPUT_TYPES:
        raise MedvitError(f"--output-type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    return output_type != "dicom-seg", output_type != "nifti"


@dataclass
class SegmentResult:
    """What was written for one input (`skipped`: found finished, left as it was).

    `mask` is the NIfTI mask and `dicom_seg` the DICOM Segmentation object; each is None
    when `output_type` did not ask for it. `windows`: the sliding windows (2D models: slice
    windows) run, and how many the whole model grid would have needed (`body_crop`).
    """

    input: Path
    mask: Path | None
    volumes: Path
    volumes_ml: dict[str, float]
    preview: Path | None = None
    statistics: Path | None = None
    skipped: bool = False
    dicom_seg: Path | None = None
    windows: tuple[int, int] | None = None

    @property
    def masks(self) -> list[Path]:
        """The mask files written (NIfTI, DICOM SEG), in that order."""
        return [p for p in (self.mask, self.dicom_seg) if p is not None]


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


@dataclass
class _Member:
    """One checkpoint of a (possibly one-member) ensemble, loaded for inference."""

    path: Path
    model: torch.nn.Module
    card: ModelCard
    prep: Preprocessing
    slices: SliceSpec | None
    native_dtype: bool


@dataclass
class Prepared:
    """A scan read and preprocessed, ready for the model(s).

    Attributes:
        scan: The scan as read.
        images: Model-space volume `(C, X, Y, Z)` per ensemble member (members with the same
            intensity settings share one tensor).
        voxel_to_model: Map from scan voxels to model-space voxels.
        box: The part of the model grid the windows run over (`body_crop`); None: all of it.
        body: The body grown by its margin, boolean over the model grid (`body_crop`): windows
            inside the box that hold none of it are skipped. None: every window runs.
    """

    scan: Scan
    images: list[torch.Tensor]
    voxel_to_model: np.ndarray
    box: tuple[slice, slice, slice] | None = None
    body: torch.Tensor | None = None


class Segmenter:
    """One checkpoint, or an ensemble of several, that turns scans into masks on their own grids.

    An ensemble averages the members' class probabilities in model space (each member with
    its own intensity preprocessing, patch size, 2D slicing and TTA) before the arg-max, as
    nnU-Net ensembles its folds. Members must have the same labels (ids and names) and the
    same target spacing and orientation (one model grid); the post-processing rules applied
    are those every member chose.
    """

    def __init__(self, checkpoint: str | Path | Sequence[str | Path], config: SegmentConfig | None = None) -> None:
        self.config = config or SegmentConfig()
        if not 0.0 <= self.config.overlap < 1.0:
            raise MedvitError(f"--overlap must be in [0, 1), got {self.config.overlap}")
        if self.config.sw_batch_size is not None and self.config.sw_batch_size < 1:
            raise MedvitError(f"--sw-batch-size must be >= 1, got {self.config.sw_batch_size}")
        if self.config.postprocess not in ("auto", "none"):
            raise MedvitError(f"--postprocess must be auto or none, got {self.config.postprocess!r}")
        if self.config.body_crop not in ("auto", "none"):
            raise MedvitError(f"--body-crop must be auto or none, got {self.config.body_crop!r}")
        self.windows: tuple[int, int] | None = None  # windows run, and over the whole grid, for the last scan
        self.writes_nifti, self.writes_dicom_seg = mask_outputs(self.config.output_type)
        paths = [Path(checkpoint)] if isinstance(checkpoint, (str, Path)) else [Path(c) for c in checkpoint]
        if not paths:
            raise MedvitError("no checkpoint given")
        self.device = local_device(resolve_device(self.config.device))
        self.sw_batch_size = self.config.sw_batch_size or (4 if self.device.type == "cuda" else 1)
        self.dtype = inference_dtype(self.device, model_precision(paths, self.config.precision))
        self.members: list[_Member] = []
        for path in paths:
            self.members.append(self._load(path))
            return_freed_memory()
        first = self.members[0]
        self.model, self.card, self.prep, self.slices = first.model, first.card, first.prep, first.slices
        self.native_dtype = first.native_dtype
        check_ensemble([(m.path, m.card) for m in self.members])
        ids = [0] + [int(self.card.labels[c]["id"]) for c in sorted(self.card.labels)]
        self.class_ids = np.array(ids, dtype=np.uint8 if max(ids) < 256 else np.uint16)
        self.keep = self._kept_classes(self.config.labels)
        self.postprocessing = common_rules([m.card.postprocessing for m in self.members])

    def _load(self, path: Path) -> _Member:
        # bf16 on a CPU: weights and activations in bf16 (norm statistics accumulate in
        # fp32); autocast would cast every activation back and forth, which costs more
        # than it saves there
        native = self.dtype == torch.bfloat16 and self.device.type == "cpu"
        model, card = load_model(path, self.device, torch.bfloat16 if native else None)
        require_task(card, path, "segmentation")
        return _Member(path, model, card, Preprocessing.from_dict(card.preprocessing), slice_spec(card, model), native)

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

    def prepare(self, scan: Scan) -> Prepared:
        """The scan in model space for every member (one resampling, shared by all).

        The grid and values are those of `preprocess_transforms` (MONAI's Orientationd,
        Spacingd, intensity presets; tested equal), computed without importing MONAI.
        """
        affine, shape = model_grid(scan.affine, scan.shape, self.prep.spacing, self.prep.orientation)
        if any(s < 1 for s in shape):
            raise MedvitError(f"{scan.path}: empty after resampling")
        resampled = resample_scan(scan.array, affine, scan.affine, shape)
        box = body = None
        if self.config.body_crop == "auto" and self._is_ct:
            axial = head_foot_axis(self.prep.orientation)
            low = body_mask_low(resampled, axial_axis=axial)  # found once, for the box and the mask
            box = body_box(resampled, self.prep.spacing, low=low)
            body = body_mask(resampled, self.prep.spacing, low=low)
        images: list[torch.Tensor] = []
        scaled: dict[str, torch.Tensor] = {}
        for member in self.members:
            prep = member.prep
            norm = prep.ct_norm() if prep.intensity == "ct-fingerprint" else None
            key = json.dumps([prep.intensity, prep.ct_window, norm])
            if key not in scaled:  # scale_intensity works in place: a copy unless there is one member
                scaled[key] = scale_intensity(resampled if len(self.members) == 1 else resampled.clone(),
                                              prep.intensity, prep.ct_window, norm)
            images.append(scaled[key])
        return Prepared(scan, images, np.linalg.solve(affine, np.asarray(scan.affine, dtype=float)), box, body)

    @property
    def _is_ct(self) -> bool:
        """Whether every member's inputs are CT in HU (where the body can be found)."""
        return all(m.prep.intensity in ("ct", "ct-fingerprint") for m in self.members)

    def _member_box(self, member: _Member, body: Sequence[slice], size: Sequence[int]) -> tuple[slice, ...]:
        """The windows of `member` that reach into the body (and a 2D model's slab neighbours)."""
        axis = member.slices.axis if member.slices is not None else None
        halo = member.slices.slab // 2 if member.slices is not None else 0
        return window_box(body, size, self._window3d(member), self.config.overlap, axis, halo)

    @staticmethod
    def _window3d(member: _Member) -> tuple[int, int, int]:
        """A member's window on the model grid (a 2D model's: its patch in plane, its slab across)."""
        if member.slices is None:
            return tuple(int(p) for p in member.card.patch_size)
        plane = iter(member.card.patch_size)
        return tuple(member.slices.slab if a == member.slices.axis else int(next(plane)) for a in range(3))

    def _window_count(self, member: _Member, size: Sequence[int], region: torch.Tensor | None = None) -> int:
        window = self._window3d(member)
        if region is not None:  # 3D members only (`_region`)
            return int(window_runs(size, window, self.config.overlap, region).sum())
        if member.slices is not None:
            return int(size[member.slices.axis]) * int(np.prod(
                [len(window_starts(max(s, w), w, self.config.overlap)) for a, (s, w) in enumerate(zip(size, window))
                 if a != member.slices.axis]))  # fmt: skip
        return int(np.prod([len(window_starts(max(s, w), w, self.config.overlap)) for s, w in zip(size, window)]))

    @property
    def store_dtype(self) -> torch.dtype:
        """Model-space probabilities are kept in fp16 unless this is the exact (fp32) path."""
        return torch.float32 if self.dtype == torch.float32 else torch.float16

    def _predictor(self, member: _Member) -> Callable[[torch.Tensor], torch.Tensor]:
        if member.native_dtype:
            return lambda x: member.model(x.to(self.dtype))

        def run(x: torch.Tensor) -> torch.Tensor:
            with autocast(self.device, True, self.dtype):
                return member.model(x)

        return run

    @torch.inference_mode()
    def _probabilities(
        self, images: Sequence[torch.Tensor], box: tuple[slice, ...] | None = None, body: torch.Tensor | None = None
    ) -> torch.Tensor | Placed:
        """Model-space class probabilities `(K, X, Y, Z)` on the CPU: averaged over the
        flips with TTA, then over the ensemble's members; with a `box`, those of the box
        (`Placed`: background outside it); with a `body` mask, 3D members skip the windows
        that hold none of it."""
        dims = [1 + a for a in self.tta_axes]
        flips = [()] if not self.config.tta else [
            axes for n in range(len(dims) + 1) for axes in itertools.combinations(dims, n)
        ]
        progress = self.config.progress and not self.config.tta and len(self.members) == 1
        size = tuple(images[0].shape[1:])
        boxes = [self._member_box(m, box, size) if box is not None else None for m in self.members]
        union = None if box is None else tuple(
            slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)
        )
        total = None
        run = full = 0
        for member, image, own in zip(self.members, images, boxes, strict=True):
            x = (image[:, own[0], own[1], own[2]] if own is not None else image).to(self.device)
            region = self._region(member, body, own)
            full += len(flips) * self._window_count(member, size)
            for axes in flips:
                xi = torch.flip(x, axes) if axes else x
                ri = torch.flip(region, [a - 1 for a in axes]) if axes and region is not None else region
                run += self._window_count(member, xi.shape[1:], ri)
                prob = self._stream(member, xi, progress, ri)
                prob = torch.flip(prob, axes) if axes else prob
                if own is not None and own != union:  # onto the union of the members' boxes
                    prob = _placed_in(prob, own, union)
                total = prob if total is None else total.add_(prob)
            del x
        runs = len(flips) * len(self.members)
        if runs > 1:
            total /= runs
        self.windows = (run, full)
        return total if union is None else Placed(total, union, size)

    @property
    def tta_axes(self) -> list[int]:
        """Model-space axes `--tta` flips: all three, but never left-right when a label is
        lateralised: the mirror image of a left kidney is a right kidney, so its prediction
        flipped back would put the right kidney's label on the left one."""
        axes = [0, 1, 2]
        if any(is_lateralised(name) for name in self.card.label_names().values()):
            axes.remove(left_right_axis(self.prep.orientation))
        return axes

    @staticmethod
    def _region(member: _Member, body: torch.Tensor | None, own: Sequence[slice] | None) -> torch.Tensor | None:
        """The body over a 3D member's box, whose windows run only where they hold some of it
        (2D members run every slice of their box)."""
        if body is None or member.slices is not None:
            return None
        return body[own[0], own[1], own[2]] if own is not None else body

    def _stream(self, member: _Member, x: torch.Tensor, progress: bool, region: torch.Tensor | None = None) -> torch.Tensor:
        k, patch = member.card.num_classes, member.card.patch_size
        if member.slices is not None:
            return stream_slice_probabilities(
                self._predictor(member), x, patch, k, member.slices, self.sw_batch_size,
                self.config.overlap, self.store_dtype, progress,
            )
        return stream_probabilities(
            self._predictor(member), x, patch, k, self.sw_batch_size, self.config.overlap,
            self.store_dtype, accumulate_on=accumulator_device(x, k, patch), progress=progress, region=region,
        )

    def predict_proba(self, scan: Scan) -> torch.Tensor:
        """Class probabilities `(C, *scan.shape)` float32 on the scan's own grid."""
        prepared = self.prepare(scan)
        prob = self._probabilities(prepared.images, prepared.box, prepared.body)
        return invert_probabilities(prob, prepared.voxel_to_model, scan.shape)

    def predict(self, scan: Scan | Prepared) -> np.ndarray:
        """The label-id mask of a scan, on the scan's own grid (computed slab by slab)."""
        prepared = scan if isinstance(scan, Prepared) else self.prepare(scan)
        scan = prepared.scan
        return_freed_memory()
        prob = self._probabilities(prepared.images, prepared.box, prepared.body)
        prepared.images = []  # the model-space volumes are not needed any more
        return_freed_memory()
        classes = invert_argmax(prob, prepared.voxel_to_model, scan.shape, self.keep)
        mask = self.class_ids[classes]
        if self.config.postprocess == "auto":
            apply_postprocessing(mask, self.postprocessing, scan.spacing)
        return mask

    @property
    def label_names(self) -> dict[int, str]:
        """Label id -> name of the labels this segmenter writes (after `labels` filtering)."""
        ids = self.class_ids.tolist()
        return {lid: name for lid, name in self.card.label_names().items() if self.keep[ids.index(lid)]}

    def volumes_ml(self, mask: np.ndarray, scan: Scan) -> dict[str, float]:
        names = self.label_names
        counts = label_counts(mask, max(names) + 1 if names else 1)
        return {name: voxel_volume_ml(counts[lid], scan.spacing) for lid, name in names.items()}

    def statistics(self, mask: np.ndarray, scan: Scan) -> dict:
        """The content of `<stem>_stats.json`: per-label voxels, volume and the scan's intensities."""
        labels = label_statistics(mask, scan.array, scan.spacing, self.label_names)
        return statistics_payload(labels, scan.spacing, self.prep.intensity, Path(scan.path).name)

    def segment_file(self, path: str | Path, out_dir: str | Path, prepared: Prepared | None = None) -> SegmentResult:
        """Segment one scan into `out_dir`; its volumes file, written last, marks it finished.

        `prepared`: the scan already read and preprocessed (`prepare`), as the batch loop
        does for the next scan while the model runs on the current one. A scan that cannot
        have the DICOM SEG asked for (not a DICOM series, slices without UIDs) fails before
        its model runs.
        """
        if self.writes_dicom_seg:
            check_dicom_seg_input(Path(path), self.config.output_type)
        prepared = prepared or self.prepare(read_scan(path))
        scan = prepared.scan
        sources = read_seg_sources(scan) if self.writes_dicom_seg else None
        mask = self.predict(prepared)
        out_dir = Path(out_dir)
        vol_target = out_dir / f"{scan.stem}_volumes.json"
        # An older volumes file would mark the scan finished while its new masks are written.
        vol_target.unlink(missing_ok=True)
        mask_path = write_mask(mask, scan, out_dir / f"{scan.stem}_seg.nii.gz") if self.writes_nifti else None
        seg_path = None
        if self.writes_dicom_seg:
            seg_path = write_dicom_seg(
                mask, scan, self.label_names, out_dir / f"{scan.stem}_seg.dcm", self.card.model_name, sources
            )
        vols = self.volumes_ml(mask, scan)
        preview = stats = None
        if self.config.preview:
            preview = write_preview(
                scan.array, mask, scan.affine, out_dir / f"{scan.stem}_preview.png", self.label_names
            )
        if self.config.statistics:
            stats = write_json(out_dir / f"{scan.stem}{STATS_SUFFIX}", self.statistics(mask, scan))
        vol_path = write_json(vol_target, vols)
        return SegmentResult(Path(path), mask_path, vol_path, vols, preview, stats, dicom_seg=seg_path,
                             windows=self.windows)


def _placed_in(prob: torch.Tensor, box: Sequence[slice], union: Sequence[slice]) -> torch.Tensor:
    """`prob` of `box` within the larger `union`, background (class 0) around it."""
    out = torch.zeros(prob.shape[0], *(u.stop - u.start for u in union), dtype=prob.dtype)
    out[0] = 1
    inner = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union))
    out[(slice(None), *inner)] = prob
    return out


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


def check_ensemble(members: Sequence[tuple[Path, ModelCard]]) -> None:
    """Refuse checkpoints that cannot be averaged: different labels, or different model grids.

    Raises:
        MedvitError: One line naming the checkpoint that differs from the first and how.
    """
    first_path, first = members[0]
    grid = Preprocessing.from_dict(first.preprocessing)
    for path, card in members[1:]:
        if card.label_names() != first.label_names():
            raise MedvitError(
                f"{path}: labels {_label_list(card)} differ from {first_path}'s {_label_list(first)}; "
                "an ensemble averages checkpoints with the same label ids and names"
            )
        prep = Preprocessing.from_dict(card.preprocessing)
        if not np.allclose(prep.spacing, grid.spacing) or prep.orientation != grid.orientation:
            raise MedvitError(
                f"{path}: model grid {prep.orientation} {tuple(prep.spacing)} mm differs from {first_path}'s "
                f"{grid.orientation} {tuple(grid.spacing)} mm; an ensemble averages on one grid"
            )


def _label_list(card: ModelCard) -> str:
    return "(" + ", ".join(f"{i}={n}" for i, n in card.label_names().items()) + ")"


def common_rules(per_member: Sequence[Sequence[dict] | None]) -> list[dict]:
    """The post-processing rules every member's card chose (all of them for one member)."""
    rules = [dict(r) for r in (per_member[0] or [])]
    return [r for r in rules if all(r in (other or []) for other in per_member[1:])]


def card_summary(card: ModelCard) -> str:
    names = ", ".join(card.label_names().values())
    slicing = ""
    if card.slicing:
        axis = {0: "sagittal", 1: "coronal", 2: "axial"}.get(card.slicing["axis"], card.slicing["axis"])
        slicing = f", 2D on {axis} slices (slab {card.slicing['slab']})"
    return f"{card.model_name} ({card.num_classes - 1} labels: {names}), patch {card.patch_size}{slicing}"
