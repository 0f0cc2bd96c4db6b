"""A folder of scans: scans per minute of `medvit segment` run four ways and of the MONAI
reference, in one run.

Usage: python benchmarks/bench_batch.py [--model CKPT] [--copies 2] [--nproc 2] [--skip-monai]

The folder holds the shared real scans (example_ct, example_ct_sm, ct_patient3 and the
DICOM series, copied), each `--copies` times under other names: 8 scans by default, of
different sizes, orientations and formats. Each way runs in fresh processes, wall time
from the first process's start to the last mask on disk:

- separate: one `medvit segment SCAN` call per scan (imports and model loading each time);
- one call: the model loaded once, scans read one after another (the default on the CPU);
- one call with prefetch: the next scan read and preprocessed in a thread while the model
  runs (the default on CUDA);
- torchrun: `torchrun --nproc_per_node N -m medvit.cli segment FOLDER`, each process with
  cores / N threads and its own share of the scans;
- one call at the default precision (bf16 on a CPU that has it), as a user runs it;
- MONAI: the inference loop of MONAI's tutorials over the same folder, the same network and
  weights (loaded once, fp32): Dataset + DataLoader (one worker reads and preprocesses the
  next scan while the model runs) with LoadImaged, EnsureChannelFirstd, Orientationd,
  Spacingd, ScaleIntensityRanged; sliding_window_inference (the checkpoint's patch, overlap
  0.5, gaussian, sw_batch_size 4); decollate_batch, Invertd, AsDiscreted(argmax), SaveImaged.

Printed: scans per minute of each and its ratio to the separate calls and to MONAI; the masks
of every fp32 medvit way are checked equal to the first's (thread counts cannot flip a
voxel); MONAI's and the default precision's are compared by the share of identical voxels.
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


def child_monai(folder: str, ckpt: str, out: str) -> None:
    """MONAI's tutorial inference loop over a folder, with the checkpoint's network and settings."""
    import torch
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted, Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd,
        SaveImaged, ScaleIntensityRanged, Spacingd,
    )

    from medvit.pipelines.checkpoint import load_checkpoint

    model, card = load_checkpoint(ckpt)  # the same network and weights, fp32
    prep = card.preprocessing
    low, high = prep["ct_window"]
    pre = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes=prep["orientation"]),
        Spacingd("image", pixdim=prep["spacing"], mode="bilinear"),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ])
    post = Compose([
        Invertd("pred", pre, orig_keys="image", nearest_interp=False),
        AsDiscreted("pred", argmax=True),
        SaveImaged("pred", output_dir=out, output_postfix="seg", separate_folder=False, resample=False,
                   output_dtype=np.uint8, print_log=False),
    ])  # fmt: skip
    files = [{"image": str(p)} for p in sorted(Path(folder).iterdir())]
    loader = DataLoader(Dataset(files, pre), batch_size=1, num_workers=1)
    with torch.no_grad():
        for batch in loader:
            logits = sliding_window_inference(batch["image"], card.patch_size, 4, model, overlap=0.5, mode="gaussian")
            batch["pred"] = torch.softmax(logits, 1)
            for item in decollate_batch(batch):
                post(item)


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
    parser.add_argument("--skip-monai", action="store_true", help="leave out the MONAI reference")
    parser.add_argument("--child-monai", nargs=3, metavar=("FOLDER", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_monai:
        child_monai(*args.child_monai)
        return
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
        ways["one call, default precision"] = [[*medvit, str(folder), "-m", args.model, "-q", "-o", str(work / "auto")]]
        outs = ["separate", "default", "prefetch", "torchrun", "auto"]
        if not args.skip_monai:
            ways["MONAI loop"] = [[sys.executable, __file__, "--child-monai", str(folder), args.model, str(work / "monai")]]
            outs.append("monai")
        print(f"{len(scans)} scans ({', '.join(SCANS)} x{args.copies}), model {Path(args.model).name}, "
              f"{cores} cores, fp32 unless said")  # fmt: skip
        times = {}
        for (way, cmds), out in zip(ways.items(), outs):
            run_env = dict(env)
            if way.startswith("torchrun"):
                run_env["OMP_NUM_THREADS"] = str(max(1, cores // args.nproc))
            times[way] = timed(cmds, run_env)
            got = masks(work / out)
            if len(got) != len(scans):
                sys.exit(f"{way}: {len(got)} masks for {len(scans)} scans")
            first = masks(work / "separate")
            if out in ("monai", "auto"):  # another pipeline, or another precision: compared, not required equal
                same = {n: float((got[n] == first[n]).mean()) if got[n].shape == first[n].shape else 0.0 for n in got}
                worst = min(same, key=same.get)
                print(f"  {way}: {min(same.values()) * 100:.3f}-{max(same.values()) * 100:.3f} % of mask voxels "
                      f"identical to medvit's fp32 masks (least: {worst})")  # fmt: skip
            elif out != "separate":
                differ = [n for n in got if not np.array_equal(got[n], first[n])]
                if differ:
                    print(f"  note: {way} masks differ from the separate calls' for {', '.join(differ)}")
        base = times["separate calls"]
        monai = times.get("MONAI loop")
        print(f"{'way':<28} {'wall s':>8} {'scans/min':>10} {'vs separate':>12} {'vs MONAI':>9}")
        for way, t in times.items():
            ratio = f"{monai / t:8.2f}x" if monai else f"{'-':>9}"
            print(f"{way:<28} {t:8.1f} {len(scans) * 60 / t:10.1f} {base / t:11.2f}x {ratio}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
