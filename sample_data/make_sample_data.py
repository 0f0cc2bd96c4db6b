"""Regenerate the sample scan and the sample checkpoint (deterministic up to CPU float noise).

Usage: python sample_data/make_sample_data.py [--steps 400]

1. `phantom_ct.nii.gz` / `phantom_labels.nii.gz`: the phantom of seed 1000 (LPS, 1.5 x 1.5 x
   3 mm), the scan the README's first command segments.
2. A training set of phantoms (seeds from 0, never 1000) and a held-out phantom (seed 2000),
   written to a temporary folder.
3. `medvit train` on it (a small UNETR), CPU, fixed seed; the best checkpoint becomes
   `phantom_unetr.safetensors`.
4. `medvit segment` + `medvit evaluate` on the held-out phantom: the Dice printed here is
   the one quoted in `sample_data/README.md`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from medvit.pipelines.phantom import make_phantom, save_phantom, write_phantom_dataset

HERE = Path(__file__).resolve().parent
MODEL_ARGS = {
    "feature_size": 8,
    "skip_indices": [1, 3, 5],
    "encoder_args": {"embed_dim": 96, "depth": 6, "num_heads": 3},
}


def medvit(*args: str) -> str:
    cmd = [sys.executable, "-m", "medvit.cli", *args]
    print("$ medvit", " ".join(args), flush=True)
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    save_phantom(make_phantom(seed=1000), HERE / "phantom_ct.nii.gz", HERE / "phantom_labels.nii.gz")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_phantom_dataset(tmp / "train", args.cases, seed=0)
        save_phantom(make_phantom(seed=2000), tmp / "heldout.nii.gz", tmp / "heldout_labels.nii.gz")
        model_args = [a for k, v in MODEL_ARGS.items() for a in ("--model-arg", f"{k}={json.dumps(v)}")]
        print(medvit(
            "train", str(data), "-o", str(tmp / "run"), "--model", "unetr_tiny", *model_args,
            "--patch-size", "48", "48", "48", "--spacing", "3", "3", "3", "--max-steps", str(args.steps),
            "--epochs", "100000", "--batch-size", "2", "--samples-per-volume", "2", "--lr", "1e-3",
            "--val-every", "25", "--val-fraction", "0.25", "--device", "cpu", "--seed", "0", "-q",
        ))
        shutil.copyfile(tmp / "run" / "best.safetensors", HERE / "phantom_unetr.safetensors")
        medvit("segment", str(tmp / "heldout.nii.gz"), "-m", str(HERE / "phantom_unetr.safetensors"),
               "-o", str(tmp / "seg"), "-q")
        print(medvit("evaluate", str(tmp / "seg" / "heldout_seg.nii.gz"), str(tmp / "heldout_labels.nii.gz"),
                     "--labels", "1=liver", "--labels", "2=spleen", "--labels", "3=kidney_right",
                     "--labels", "4=kidney_left", "--csv", str(tmp / "eval.csv")))


if __name__ == "__main__":
    main()
