"""Segment batches of scans: `medvit segment`'s Python API.

A batch survives bad scans: each is reported and the others are segmented. Every output
is written under a temporary name and renamed, and `<stem>_volumes.json` is written last
(`medvit.pipelines.segmenter`), so a scan is finished exactly when its volumes file
exists; `skip_existing` resumes a killed batch from there. The next scan is read and
preprocessed while the model runs on the current one (on CUDA), and under torchrun each
process takes its own share of the scans.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from medvit.pipelines.atomic import remove_temporaries
from medvit.pipelines.errors import MedvitError, one_line
from medvit.pipelines.io import Scan, find_scans, read_scan, scan_stem
from medvit.pipelines.runtime import local_device, process_rank, resolve_device, return_freed_memory
from medvit.pipelines.segmenter import (  # noqa: F401 - the public names of `medvit segment`'s API
    OUTPUT_TYPES,
    Prepared,
    SegmentConfig,
    Segmenter,
    SegmentResult,
    card_summary,
    check_ensemble,
    common_rules,
    label_counts,
    mask_outputs,
    slice_spec,
)
from medvit.pipelines.statistics import STATS_SUFFIX


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


def segment(
    inputs: Sequence[str | Path],
    checkpoint: str | Path | Sequence[str | Path],
    out_dir: str | Path,
    config: SegmentConfig | None = None,
    on_result: Callable[[SegmentResult], None] | None = None,
) -> list[SegmentResult]:
    """Segment every scan named by `inputs` (files, DICOM folders, folders of scans).

    A bad scan (missing, unreadable, not 3D, non-finite, failing to segment or to be
    written) does not stop the batch: it is recorded and the next scan goes on. Two
    scans whose outputs would share a name are a failure of the later one. The model is
    loaded when the first scan needs it. While the model runs on one scan, the next one
    is read and preprocessed in a background thread (`config.prefetch`; by default when
    the model runs on CUDA).

    Under `torchrun` (or any launcher setting RANK and WORLD_SIZE) each process takes a
    disjoint share of the scans (`batch_share`), so every scan is segmented exactly once
    over all processes; input problems are reported by rank 0 only.

    Args:
        inputs: Scan files and folders as the user gave them.
        checkpoint: The model, or several to average as an ensemble.
        out_dir: Output folder, created if needed.
        config: Options; `skip_existing` resumes a killed batch.
        on_result: Called with each scan's result as soon as it is written (or skipped).

    Returns:
        The results of this process's scans, in input order, when every scan succeeded.

    Raises:
        MedvitError: The output folder, checkpoint or settings are unusable; raised
            before any scan is segmented.
        BatchError: After the whole batch, when some scans failed.
    """
    config = config or SegmentConfig()
    mask_outputs(config.output_type)
    out = Path(out_dir)
    failures: list[ScanFailure] = []
    paths = _expand_inputs(inputs, failures)
    world, rank, _ = process_rank()
    paths = batch_share(paths, rank, world)
    if rank > 0:
        failures = []  # rank 0 reports the inputs' problems once
    _check_output_folder(out)
    results: list[SegmentResult] = []
    todo: list[Path] = []
    for path in paths:
        _remove_temporaries(out, scan_stem(path))
        done = _finished(out, path, config) if config.skip_existing else None
        if done is None:
            todo.append(path)
            continue
        results.append(done)
        if on_result is not None:
            on_result(done)
    if todo:
        _run_batch(todo, checkpoint, out, config, results, failures, on_result)
    if failures:
        raise BatchError(failures, results, out)
    order = {p: i for i, p in enumerate(paths)}
    return sorted(results, key=lambda r: order[r.input])


def _run_batch(
    paths: list[Path],
    checkpoint: str | Path | Sequence[str | Path],
    out: Path,
    config: SegmentConfig,
    results: list[SegmentResult],
    failures: list[ScanFailure],
    on_result: Callable[[SegmentResult], None] | None,
) -> None:
    """Segment `paths` in order; the next scan is read and preprocessed while the model runs."""
    seg: Segmenter | None = None
    prefetch = config.prefetch
    if prefetch is None:
        prefetch = local_device(resolve_device(config.device)).type == "cuda"
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvit-read") if prefetch else None

    def read(path: Path) -> Scan | Prepared:
        scan = read_scan(path)
        return scan if seg is None else seg.prepare(scan)

    def ahead(i: int) -> Future | None:
        return reader.submit(read, paths[i]) if reader is not None and i < len(paths) else None

    try:
        upcoming = ahead(0)  # the first scan is read while the model loads
        for i, path in enumerate(tqdm(paths, desc="scans", disable=not config.progress or len(paths) < 2)):
            current, upcoming = upcoming, None
            if seg is None:
                seg = Segmenter(checkpoint, config)  # a bad checkpoint or setting fails the whole batch
            try:
                item = current.result() if current is not None else read(path)
                upcoming = ahead(i + 1)
                prepared = item if isinstance(item, Prepared) else seg.prepare(item)
                del item
                results.append(seg.segment_file(path, out, prepared))
            except (MedvitError, MemoryError, torch.OutOfMemoryError) as exc:
                failures.append(ScanFailure(path, _problem_line(path, exc)))
                prepared = None
                return_freed_memory()
                upcoming = upcoming or ahead(i + 1)
                continue
            del prepared
            if on_result is not None:
                on_result(results[-1])
    finally:
        if reader is not None:
            reader.shutdown(wait=True, cancel_futures=True)


def batch_share(paths: Sequence[Path], rank: int, world: int) -> list[Path]:
    """This rank's scans: every `world`-th of the batch from `rank` on (disjoint, together all)."""
    return list(paths[rank::world])


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
    for suffix in ("_seg.nii.gz", "_seg.dcm", "_volumes.json", "_preview.png", STATS_SUFFIX):
        remove_temporaries(out / f"{stem}{suffix}")


def _finished(out: Path, path: Path, config: SegmentConfig) -> SegmentResult | None:
    """The result of a scan finished by an earlier run, or None when it must be (re)done."""
    stem = scan_stem(path)
    vols, png, stats = out / f"{stem}_volumes.json", out / f"{stem}_preview.png", out / f"{stem}{STATS_SUFFIX}"
    nifti, dicom_seg = mask_outputs(config.output_type)
    mask = out / f"{stem}_seg.nii.gz" if nifti else None
    seg = out / f"{stem}_seg.dcm" if dicom_seg else None
    png, stats = (png if config.preview else None), (stats if config.statistics else None)
    if not all(p.is_file() for p in (mask, seg, vols, png, stats) if p is not None):
        return None
    try:
        volumes = json.loads(vols.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(volumes, dict):
        return None
    return SegmentResult(path, mask, vols, volumes, png, stats, skipped=True, dicom_seg=seg)


def _problem_line(path: Path, exc: BaseException) -> str:
    text = one_line(str(exc))
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        text = f"out of memory ({text})" if text else "out of memory"
    return text if text.startswith(str(path)) else f"{path}: {text}"


