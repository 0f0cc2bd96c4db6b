"""Batch segmentation over several processes (torchrun): each scan masked exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvit.pipelines.phantom import make_phantom, save_phantom
from medvit.pipelines.segment import BatchError, SegmentConfig, batch_share, segment

NAMES = ["a", "b", "c", "d", "e"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    scans = tmp_path_factory.mktemp("folder")
    for i, name in enumerate(NAMES):
        ph = make_phantom(seed=40 + i, shape=(30, 26, 10), spacing=(3.0, 3.0, 6.0))
        save_phantom(ph, scans / f"{name}.nii.gz", scans.parent / f"{scans.name}_{name}_labels.nii.gz")
    return scans


def test_shares_are_disjoint_and_cover_the_batch() -> None:
    paths = [Path(f"{i}.nii.gz") for i in range(11)]
    for world in (1, 2, 3, 4, 16):
        shares = [batch_share(paths, rank, world) for rank in range(world)]
        flat = [p for share in shares for p in share]
        assert sorted(flat) == sorted(paths) and len(flat) == len(paths)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _torchrun(folder: Path, ckpt: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "medvit.cli", "segment", str(folder), "-m", str(ckpt), "-o", str(out), "-q", "--precision", "fp32", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def _segmented(stdout: str) -> list[str]:
    return sorted(Path(line.split(" -> ")[0]).name for line in stdout.splitlines() if " -> " in line)


def test_two_processes_mask_each_scan_once_and_resume(tmp_path, folder, tiny_checkpoint) -> None:
    out = tmp_path / "out"
    proc = _torchrun(folder, tiny_checkpoint, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _segmented(proc.stdout) == [f"{n}.nii.gz" for n in NAMES]  # five lines over both ranks: once each
    expected = segment([folder], tiny_checkpoint, tmp_path / "one", SegmentConfig(progress=False, precision="fp32"))
    for r in expected:
        ours = np.asarray(nib.load(str(out / r.mask.name)).dataobj)
        np.testing.assert_array_equal(ours, np.asarray(nib.load(str(r.mask)).dataobj))
        assert json.loads((out / r.volumes.name).read_text()) == r.volumes_ml
    # a restarted job with --skip-existing does only what is missing
    (out / "c_volumes.json").unlink()
    (out / "e_seg.nii.gz").unlink()
    again = _torchrun(folder, tiny_checkpoint, out, "--skip-existing")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _segmented(again.stdout) == ["c.nii.gz", "e.nii.gz"]
    assert again.stdout.count("already segmented") == 3


def test_rank_environment_picks_the_share(tmp_path, folder, tiny_checkpoint, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    results = segment([folder], tiny_checkpoint, tmp_path / "out", SegmentConfig(progress=False))
    assert [r.input.name for r in results] == ["b.nii.gz", "d.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*_seg.nii.gz")) == ["b_seg.nii.gz", "d_seg.nii.gz"]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(Exception, match="RANK=2 is not in 0..WORLD_SIZE-1"):
        segment([folder], tiny_checkpoint, tmp_path / "out", SegmentConfig(progress=False))


def test_prefetch_gives_the_same_outputs_and_reports_a_bad_next_scan(tmp_path, folder, tiny_checkpoint) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not an image\n")
    inputs = [folder / "a.nii.gz", bad, folder / "b.nii.gz"]
    outs = {}
    for prefetch in (False, True):
        out = tmp_path / f"out_{prefetch}"
        with pytest.raises(BatchError) as info:
            segment(inputs, tiny_checkpoint, out, SegmentConfig(progress=False, prefetch=prefetch))
        (failure,) = info.value.failures
        assert failure.input == bad and failure.problem.startswith(f"{bad}: ")
        assert [r.input.name for r in info.value.results] == ["a.nii.gz", "b.nii.gz"]
        outs[prefetch] = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in out.glob("*_seg.nii.gz")}
    assert sorted(outs[True]) == sorted(outs[False]) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    for name in outs[True]:
        np.testing.assert_array_equal(outs[True][name], outs[False][name])
