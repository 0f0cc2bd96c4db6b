"""Regenerate the sample scan and the sample checkpoint (deterministic up to CPU float noise).

Usage: python sample_data/make_sample_data.py [--cases 16] [--steps 900]

1. `phantom_ct.nii.gz` / `phantom_labels.nii.gz`: the phantom of seed 1000 (LPS, 1.5 x 1.5 x
   3 mm), the scan the README's first command segments.
2. A training set of phantoms (seeds from 0, never 1000) and a held-out phantom (seed 2000),
   written to a temporary folder.
3. `medvit train` on it (a slim 3D SegFormer), CPU, fixed seed; the checkpoint with the best
   mean Dice on the training set's own validation cases becomes `phantom_segformer3d.safetensors`.
4. `medvit segment` + `medvit evaluate` on the held-out phantom: the Dice printed here is
   the one quoted in `sample_data/README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medvit.pipelines.phantom import make_phantom, save_phantom, write_phantom_dataset

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "phantom_segformer3d.safetensors"
MODEL = "segformer3d_b0"
# MiT-B0 at half width and a 64-wide decoder: 1.5M parameters, a 6 MB checkpoint
MODEL_ARGS = {
    "decoder_dim": 64,
    "encoder_args": {"embed_dim": [16, 32, 80, 128], "num_heads": [1, 2, 5, 8]},
}
# 2 x 2 x 3 mm: a 64 x 64 x 32 window spans 128 x 128 x 96 mm, the whole body in-plane, so
# every crop shows on which side the liver lies even when training flips it left-right
SPACING = ("2", "2", "3")
PATCH = ("64", "64", "32")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def medvit(*args: str, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "medvit.cli", *args]
    print("$ medvit", " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=16)
    p.add_argument("--steps", type=int, default=900)
    args = p.parse_args()
    save_phantom(make_phantom(seed=1000), HERE / "phantom_ct.nii.gz", HERE / "phantom_labels.nii.gz")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_phantom_dataset(tmp / "train", args.cases, seed=0)
        save_phantom(make_phantom(seed=2000), tmp / "heldout.nii.gz", tmp / "heldout_labels.nii.gz")
        model_args = [a for k, v in MODEL_ARGS.items() for a in ("--model-arg", f"{k}={json.dumps(v)}")]
        # One thread: on a shared 2-core machine two threads keep waiting for each other
        # (steps measured several times slower under load), and the result does not depend on the core count.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        start, cpu = time.monotonic(), _children_cpu()
        print(medvit(
            "train", str(data), "-o", str(tmp / "run"), "--model", MODEL, *model_args,
            "--patch-size", *PATCH, "--spacing", *SPACING, "--max-steps", str(args.steps),
            "--epochs", "100000", "--batch-size", "2", "--samples-per-volume", "2", "--lr", "2e-3",
            "--val-every", "25", "--val-fraction", "0.25", "--device", "cpu", "--seed", "0", "-q",
            env=env,
        ))
        print(f"training took {(time.monotonic() - start) / 60:.1f} min of wall time, "
              f"{(_children_cpu() - cpu) / 60:.1f} min of CPU time", flush=True)
        shutil.copyfile(tmp / "run" / "best.safetensors", CHECKPOINT)
        print(medvit("segment", str(tmp / "heldout.nii.gz"), "-m", str(CHECKPOINT), "-o", str(tmp / "seg"), "-q"))
        print(medvit("evaluate", str(tmp / "seg" / "heldout_seg.nii.gz"), str(tmp / "heldout_labels.nii.gz"),
                     "--labels", "1=liver", "--labels", "2=spleen", "--labels", "3=kidney_right",
                     "--labels", "4=kidney_left", "--csv", str(tmp / "eval.csv")))


if __name__ == "__main__":
    main()
