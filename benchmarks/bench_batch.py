"""A folder of scans: scans per minute of `medvit segment` run four ways, in one run.

Usage: python benchmarks/bench_batch.py [--model CKPT] [--copies 2] [--nproc 2]

The folder holds the shared real scans (example_ct, example_ct_sm, ct_patient3 and the
DICOM series, copied), each `--copies` times under other names: 8 scans by default, of
different sizes, orientations and formats. Each way runs in fresh processes, wall time
from the first process's start to the last mask on disk:

- separate: one `medvit segment SCAN` call per scan (imports and model loading each time);
- one call: the model loaded once, scans read one after another (the default on the CPU);
- one call with prefetch: the next scan read and preprocessed in a thread while the model
  runs (the default on CUDA);
- torchrun: `torchrun --nproc_per_node N -m medvit.cli segment FOLDER`, each process with
  cores / N threads and its own share of the scans.

Printed: scans per minute of each and its ratio to the separate calls; the masks of every
way are checked equal to the first's (fp32 throughout, so thread counts cannot flip a voxel).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCANS = {
    "example_ct": DATA / "ct" / "example_ct.nii.gz",
    "example_ct_sm": DATA / "ct" / "example_ct_sm.nii.gz",
    "patient3": DATA / "ct_patient3" / "ct.nii.gz",
    "dicom": DATA / "ct_dicom",
}
PREFETCH = (
    "import sys; from medvit.pipelines.segment import SegmentConfig, segment; "
    "segment([sys.argv[1]], sys.argv[2], sys.argv[3], SegmentConfig(progress=False, precision='fp32', prefetch=True))"
)


def make_folder(folder: Path, copies: int) -> list[Path]:
    folder.mkdir(parents=True)
    made = []
    for copy in range(copies):
        for name, src in SCANS.items():
            dst = folder / (f"{name}_{copy}" + (".nii.gz" if src.is_file() else ""))
            # copies, not links: a batch counts a scan reached twice through links once
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                shutil.copy2(src, dst)
            made.append(dst)
    return made


def timed(cmds: list[list[str]], env: dict[str, str]) -> float:
    start = time.perf_counter()
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.glob("*_seg.nii.gz"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "sample_data" / "phantom_segformer3d.safetensors"))
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"shared real scans not found at {DATA}")
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="medvit-batch-"))
    try:
        folder = work / "scans"
        scans = make_folder(folder, args.copies)
        medvit = [sys.executable, "-m", "medvit.cli", "segment"]
        opts = ["-m", args.model, "--precision", "fp32", "-q"]
        env = {**os.environ, "OMP_NUM_THREADS": str(cores)}
        ways = {
            "separate calls": [[*medvit, str(s), *opts, "-o", str(work / "separate")] for s in scans],
            "one call": [[*medvit, str(folder), *opts, "-o", str(work / "default")]],
            "one call, prefetch": [[sys.executable, "-c", PREFETCH, str(folder), args.model, str(work / "prefetch")]],
            f"torchrun x{args.nproc}": [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", str(args.nproc), "-m", "medvit.cli", "segment",
                                         str(folder), *opts, "-o", str(work / "torchrun")]],  # fmt: skip
        }
        outs = ["separate", "default", "prefetch", "torchrun"]
        print(f"{len(scans)} scans ({', '.join(SCANS)} x{args.copies}), model {Path(args.model).name}, "
              f"{cores} cores, fp32")  # fmt: skip
        times = {}
        for (way, cmds), out in zip(ways.items(), outs):
            run_env = dict(env)
            if way.startswith("torchrun"):
                run_env["OMP_NUM_THREADS"] = str(max(1, cores // args.nproc))
            times[way] = timed(cmds, run_env)
            got = masks(work / out)
            if len(got) != len(scans):
                sys.exit(f"{way}: {len(got)} masks for {len(scans)} scans")
            if out != "separate":
                first = masks(work / "separate")
                differ = [n for n in got if not np.array_equal(got[n], first[n])]
                if differ:
                    print(f"  note: {way} masks differ from the separate calls' for {', '.join(differ)}")
        base = times["separate calls"]
        print(f"{'way':<24} {'wall s':>8} {'scans/min':>10} {'vs separate':>12}")
        for way, t in times.items():
            print(f"{way:<24} {t:8.1f} {len(scans) * 60 / t:10.1f} {base / t:11.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
