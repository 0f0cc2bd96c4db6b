"""Train a segmentation model on the shared real CT, then segment the full CT and the DICOM series.

Usage: python benchmarks/train_real_ct.py [-o OUT]      (the recommended CPU run: segformer_b0 on axial
       slabs of 3 slices, 96x96 crops, 16 a step, 1150 steps, `medvit train`'s default recipe)
       python benchmarks/train_real_ct.py --model segformer3d_b0 --patch-size 64 64 32 --slab 1 --samples-per-volume 4
       python benchmarks/train_real_ct.py --model unetr_tiny --patch-size 64 64 32 --slab 1 --max-steps 240
       python benchmarks/train_real_ct.py --recipe light --intensity ct-fingerprint   (see medvit train)

The training scan is `../shared/data/ct/example_ct_sm.nii.gz` with TotalSegmentator's
reference labels for spleen (1), kidneys (2, 3) and liver (5); everything runs through the
same pipelines as `medvit train` / `medvit segment` / `medvit evaluate`. Reported:
wall times, validation Dice on the training scan (sliding window, model space), Dice of
the exported mask on the scan's own grid, and Dice of the full-CT mask on the 30 slices
that `example_ct_sm` was cut from (slices 82-111 of `example_ct`), with and without the
post-processing rules the run chose.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medvit.pipelines.checkpoint import read_card
from medvit.pipelines.segment import SegmentConfig, segment
from medvit.pipelines.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LABELS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
SM_SLICES = slice(82, 112)  # example_ct_sm is these slices of example_ct


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", type=Path, default=Path(tempfile.mkdtemp(prefix="medvit_real_ct_")))
    p.add_argument("--model", default="segformer_b0")
    p.add_argument("--max-steps", type=int, default=1150)
    p.add_argument("--patch-size", type=int, nargs=3, default=(96, 96, 1))
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--samples-per-volume", type=int, default=16)
    p.add_argument("--val-every", type=int, default=300)
    p.add_argument("--feature-size", type=int, default=None, help="UNETR-family decoder width")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=JSON", help="extra model argument")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--recipe", default="default", help="training recipe (medvit train --recipe)")
    p.add_argument("--intensity", default=None, help="intensity preset (medvit train --intensity)")
    p.add_argument("--slab", type=int, default=3, help="2D models: slices as channels")
    p.add_argument("--slice-axis", type=int, default=2, help="2D models: 0 sagittal, 1 coronal, 2 axial")
    p.add_argument("--segment-only", action="store_true", help="reuse OUT/run, only segment and score")
    p.add_argument("--checkpoint", choices=["last", "best"], default="last",
                   help="last: the final weights (default, no selection); best: best mean validation Dice")
    args = p.parse_args()
    if not (DATA / "ct" / "example_ct_sm.nii.gz").exists():
        raise SystemExit(f"shared data not found at {DATA}")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # the reference map has 42 structures; the dataset declares the organs, so its label map holds only those
    seg = nib.load(DATA / "ct" / "example_seg.nii.gz")
    organs = np.where(np.isin(np.asarray(seg.dataobj), list(LABELS)), np.asarray(seg.dataobj), 0).astype(np.uint8)
    nib.save(nib.Nifti1Image(organs, seg.affine, seg.header), out / "organs_seg.nii.gz")
    ds = {
        "name": "example_ct_sm", "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS.items()}},
        "training": [{"image": str(DATA / "ct" / "example_ct_sm.nii.gz"), "label": str(out / "organs_seg.nii.gz")}],
    }
    (out / "dataset.json").write_text(json.dumps(ds, indent=2))

    model_args = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.model_arg)}
    if args.feature_size is not None:
        model_args["feature_size"] = args.feature_size
    t0 = time.perf_counter()
    config = TrainConfig(
        data=out / "dataset.json", out_dir=out / "run", model=args.model,
        model_args=model_args, max_steps=args.max_steps,
        patch_size=tuple(args.patch_size), slice_axis=args.slice_axis, slab=args.slab, spacing=(3.0, 3.0, 3.0),
        batch_size=args.batch_size, samples_per_volume=args.samples_per_volume, lr=args.lr,
        val_every=args.val_every, device="cpu", recipe=args.recipe, intensity=args.intensity,
    )
    if args.segment_only:
        card = read_card(out / "run" / "last.safetensors")
        steps, last_dice, t_train = card.extra["step"], card.extra["last_dice"], float("nan")
    else:
        result = train(config)
        steps, last_dice = result.steps, result.last_dice
        t_train = time.perf_counter() - t0

    t0 = time.perf_counter()
    cfg = SegmentConfig(progress=False, device="cpu")
    inputs = [DATA / "ct" / "example_ct_sm.nii.gz", DATA / "ct" / "example_ct.nii.gz", DATA / "ct_dicom"]
    seg = segment(inputs, out / "run" / f"{args.checkpoint}.safetensors", out / "masks", cfg)
    t_seg = time.perf_counter() - t0
    raw_cfg = SegmentConfig(progress=False, device="cpu", postprocess="none")
    raw = segment([inputs[1]], out / "run" / f"{args.checkpoint}.safetensors", out / "masks_raw", raw_cfg)[0]

    ref = np.asarray(nib.load(DATA / "ct" / "example_seg.nii.gz").dataobj)
    sm = np.asarray(nib.load(seg[0].mask).dataobj)
    full = np.asarray(nib.load(seg[1].mask).dataobj)
    full_raw = np.asarray(nib.load(raw.mask).dataobj)
    used = read_card(out / "run" / f"{args.checkpoint}.safetensors")
    report = {
        "model": args.model, "model_args": model_args, "checkpoint": args.checkpoint, "recipe": args.recipe,
        "intensity": used.preprocessing["intensity"], "postprocessing": used.postprocessing,
        "patch_size": list(args.patch_size), "slab": args.slab, "batch_size": args.batch_size, "steps": steps,
        "train_seconds": round(t_train, 1), "segment_seconds_3_scans": round(t_seg, 1),
        "val_dice_model_space": {k: round(v, 4) for k, v in last_dice.items()},
        "dice_sm_on_input_grid": {n: round(dice(sm == i, ref == i), 4) for i, n in LABELS.items()},
        "dice_full_ct_on_sm_slices": {n: round(dice(full[:, :, SM_SLICES] == i, ref == i), 4) for i, n in LABELS.items()},
        "dice_full_ct_on_sm_slices_without_postprocessing": {
            n: round(dice(full_raw[:, :, SM_SLICES] == i, ref == i), 4) for i, n in LABELS.items()
        },
        "dicom_mask": str(seg[2].mask), "dicom_volumes_ml": seg[2].volumes_ml,
        "full_ct_volumes_ml": seg[1].volumes_ml, "full_ct_volumes_ml_without_postprocessing": raw.volumes_ml,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
