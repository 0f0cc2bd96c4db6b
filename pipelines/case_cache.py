"""Training cases preprocessed once and kept on disk, read a crop at a time.

`medvit train` does not hold its dataset in memory. Each case is reoriented, resampled,
normalised and remapped once, the first time a run needs it, and stored as uncompressed
`.npy` arrays with the voxel indices its crop sampler draws centres from. Later epochs,
later runs with the same preprocessing and every DDP rank read it from there: a crop is
read from a memory map opened for that crop only, so a process holds the crops of its
batches, not the dataset, and start-up does not grow with the number of cases.

A case's folder is named by a hash of what its arrays depend on: the source files (path,
size, modification time), the preprocessing, the label remapping and this format's
version. It is written under a temporary name and renamed into place whole, so a folder
that exists is complete, and two processes filling the same case at once both leave one
correct folder; a killed fill's temporary folder is removed by the next fill of that case.
The cache lives in ``$MEDVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/medvit/cases``
(``~/.cache/medvit/cases``), or where ``--cache-dir`` says; deleting it is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvit.pipelines.errors import DatasetError, one_line

__all__ = ["CACHE_ENV", "CachedCase", "CaseCache", "centre_groups", "default_cache_dir", "read_box"]

CACHE_ENV = "MEDVIT_CACHE_DIR"
FORMAT = 1
# Crop centres kept per class (and for the foreground / background of the pos-neg sampler):
# enough to cover an organ, and a 512^3 scan's background is not a gigabyte of indices.
MAX_CENTRES = 50_000
# A temporary folder older than this is a killed fill's leftover (a fill takes seconds to minutes)
STALE_FILL_S = 3600.0


def default_cache_dir() -> Path:
    """``$MEDVIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/medvit/cases``, else ``~/.cache/medvit/cases``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medvit" / "cases"


def _file_state(path: Path) -> list[Any]:
    """What identifies a source's content cheaply: path, size and mtime (of each file of a folder)."""
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _sampled(indices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if indices.size > MAX_CENTRES:
        indices = np.sort(rng.choice(indices, MAX_CENTRES, replace=False))
    return indices.astype(np.int64)


def centre_groups(label: np.ndarray, image: np.ndarray, num_classes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Flat voxel indices crop centres are drawn from, at most `MAX_CENTRES` per group:
    `class<k>` for each class (RandCropByLabelClassesd's), and `fg` (labelled voxels) and `bg`
    (unlabelled voxels whose image is above 0) for RandCropByPosNegLabeld's."""
    flat = label.reshape(-1)
    groups = {f"class{k}": _sampled(np.flatnonzero(flat == k), rng) for k in range(num_classes)}
    groups["fg"] = _sampled(np.flatnonzero(flat > 0), rng)
    groups["bg"] = _sampled(np.flatnonzero((flat == 0) & (image.reshape(-1) > 0)), rng)
    return groups


@dataclass(frozen=True)
class CachedCase:
    """One preprocessed case on disk: `image.npy` (C, X, Y, Z) float32, `label.npy` (X, Y, Z)
    class indices, `centres.npy` (flat voxel indices, grouped as `groups` says) and `meta.json`."""

    name: str
    folder: Path
    shape: tuple[int, int, int]
    channels: int
    affine: np.ndarray
    groups: dict[str, list[int]]  # group -> [start, stop) in centres.npy

    def arrays(self, mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(image, label); memory-mapped read-only unless `mmap` is False."""
        mode = "r" if mmap else None
        return np.load(self.folder / "image.npy", mmap_mode=mode), np.load(self.folder / "label.npy", mmap_mode=mode)

    def centres(self, group: str) -> np.ndarray:
        """Flat voxel indices of one group (`class<k>`, `fg` or `bg`); empty if it has none."""
        start, stop = self.groups[group]
        if stop == start:
            return np.zeros(0, np.int64)
        return np.array(np.load(self.folder / "centres.npy", mmap_mode="r")[start:stop])

    @property
    def voxel_ml(self) -> float:
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


class CaseCache:
    """The preprocessed cases of one preprocessing, filled on first use.

    Args:
        root: The cache folder.
        load: Reads a case (`{"image": path, "label": path}`) into model space: channel-first
            image and label tensors (the training's MONAI preprocessing).
        settings: Everything besides the source files that the arrays depend on
            (preprocessing, label remapping, foreground crop); part of each case's key.
        num_classes: Classes including background (labels hold 0..num_classes - 1).
    """

    def __init__(
        self, root: str | Path, load: Callable[[dict[str, str]], dict[str, Any]], settings: dict[str, Any],
        num_classes: int,
    ) -> None:
        self.root = Path(root)
        self.load = load
        self.settings = json.loads(json.dumps(settings, default=str))
        self.num_classes = int(num_classes)

    def key(self, case: Any) -> str:
        import medvit

        what = {
            "format": FORMAT, "medvit": medvit.__version__, "settings": self.settings, "classes": self.num_classes,
            "image": _file_state(Path(case.image)), "label": _file_state(Path(case.label)),
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]

    def folder(self, case: Any) -> Path:
        return self.root / self.key(case)

    def get(self, case: Any) -> CachedCase:
        """The cached case, preprocessing and storing it first if no run has yet."""
        folder = self.folder(case)
        meta = folder / "meta.json"
        if not meta.exists():
            self._fill(case, folder)
        info = json.loads(meta.read_text())
        return CachedCase(
            name=case.name, folder=folder, shape=tuple(info["shape"]), channels=int(info["channels"]),
            affine=np.asarray(info["affine"], dtype=np.float64), groups={k: list(v) for k, v in info["groups"].items()},
        )

    def _fill(self, case: Any, folder: Path) -> None:
        data = self.load({"image": str(case.image), "label": str(case.label)})
        image = np.ascontiguousarray(np.asarray(data["image"], dtype=np.float32))
        label = np.asarray(data["label"])[0]
        affine = np.asarray(data["image"].affine, dtype=np.float64)
        del data
        label = np.rint(label).astype(np.uint8 if self.num_classes <= 256 else np.int16)
        groups = centre_groups(label, image[0], self.num_classes, np.random.default_rng(int(folder.name[:8], 16)))
        spans, start = {}, 0
        for name, idx in groups.items():
            spans[name] = [start, start + idx.size]
            start += idx.size
        meta = {
            "case": case.name, "image": str(case.image), "label": str(case.label), "shape": list(label.shape),
            "channels": int(image.shape[0]), "affine": affine.tolist(), "groups": spans,
        }
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.root, folder.name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=self.root))
        except OSError as exc:
            raise DatasetError.at(self.root, f"cannot write the preprocessed-case cache ({one_line(str(exc))})") from None
        try:
            np.save(tmp / "image.npy", image)
            np.save(tmp / "label.npy", label)
            np.save(tmp / "centres.npy", np.concatenate(list(groups.values())))
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, folder)
            except OSError:
                if not (folder / "meta.json").exists():  # not another process finishing first
                    raise
        except OSError as exc:
            raise DatasetError.at(self.root, f"cannot write the preprocessed-case cache ({one_line(str(exc))})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(root: Path, key: str, older_than_s: float = STALE_FILL_S) -> None:
    """Temporary folders of this case left by a fill that was killed (SIGKILL runs no clean-up);
    a younger one may be another process's fill still under way, and stays."""
    for tmp in root.glob(f".{key}.*"):
        try:
            if time.time() - tmp.stat().st_mtime > older_than_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue


def read_box(array: np.ndarray, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """`array[..., start:start+size]` over its last len(size) axes, zero where the box leaves it."""
    spatial = array.shape[-len(size):]
    out = np.zeros(array.shape[: -len(size)] + tuple(int(s) for s in size), dtype=array.dtype)
    src, dst = [], []
    for s0, n, dim in zip(start, size, spatial):
        lo, hi = max(int(s0), 0), min(int(s0) + int(n), dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(s0), hi - int(s0)))
    lead = (slice(None),) * (array.ndim - len(size))
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out
