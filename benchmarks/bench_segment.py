"""End-to-end segmentation: `medvit segment` against the MONAI reference pipeline.

Usage: python benchmarks/bench_segment.py [--scan ../shared/data/ct/example_ct.nii.gz] [--fidelity]
       python benchmarks/bench_segment.py --large           # synthetic 512x512x400 CT
       python benchmarks/bench_segment.py --agreement CKPT  # default path vs exact path, trained weights
       python benchmarks/bench_segment.py --network swin_unetr  # MONAI SwinUNETR / swin_unetr_base
       python benchmarks/bench_segment.py --scan ../shared/data/ct_dicom --crop-agreement CKPT
                                            # windows over the body vs over the whole grid

Both sides run in their own fresh process on the same scan and the same weights (a
random-initialised MONAI `UNETR`, paper configuration, 14 classes, or with `--network
swin_unetr` a MONAI `SwinUNETR` at feature size 48; saved with torch.save and brought to
medvit with `medvit convert`):

- reference: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) -> Spacingd(1.5, 1.5, 2.0)
  -> ScaleIntensityRanged(-175..250 -> 0..1, clip) -> sliding_window_inference(96^3, overlap
  0.5, gaussian, sw_batch_size 4) -> Invertd -> argmax -> SaveImaged;
- medvit: `medvit segment SCAN --model CKPT -o OUT` with the same settings.

Printed: each side's wall time (process start to mask on disk, imports included) and
peak RSS, the speed ratio, and the per-label Dice between the two masks. `--fidelity`
adds untimed runs that save both sides' inverted probabilities (medvit on its exact fp32
path) and prints their max abs difference. `--large` runs both sides on a synthetic
512x512x400 CT (the shared CT resampled to that grid, 0.71 x 0.59 x 0.84 mm). `--agreement
CKPT` segments with a trained medvit checkpoint on the default path and on the exact fp32
path (separate processes) and prints the per-label Dice between them.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW, DEFAULT_SPACING

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPACING = DEFAULT_SPACING
ROI = (96, 96, 96)
NUM_CLASSES = 14
# --network: medvit's registered model for each MONAI reference network
NETWORKS = {"unetr": "unetr_base", "swin_unetr": "swin_unetr_base"}


def monai_network(name: str):
    """The MONAI reference network in its paper configuration, random weights."""
    from monai.networks.nets import UNETR, SwinUNETR

    if name == "swin_unetr":
        return SwinUNETR(in_channels=1, out_channels=NUM_CLASSES, feature_size=48)
    return UNETR(1, NUM_CLASSES, ROI)


def child_monai(scan: str, weights: str, out: str, probs: str | None, network: str = "unetr") -> None:
    import torch
    from monai.data import MetaTensor
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted, Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd,
        SaveImaged, ScaleIntensityRanged, Spacingd,
    )

    model = monai_network(network)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    pre = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=SPACING, mode="bilinear"),
        ScaleIntensityRanged(
            "image", a_min=DEFAULT_CT_WINDOW[0], a_max=DEFAULT_CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True
        ),
    ])
    d = pre({"image": scan})
    with torch.no_grad():
        logits = sliding_window_inference(d["image"][None], ROI, 4, model, overlap=0.5, mode="gaussian")
    pred = MetaTensor(torch.softmax(logits[0], 0), meta=d["image"].meta, applied_operations=d["image"].applied_operations)
    d["pred"] = pred
    d = Invertd("pred", pre, orig_keys="image", nearest_interp=False)(d)
    if probs:
        np.save(probs, d["pred"].numpy().astype(np.float32))
    d = AsDiscreted("pred", argmax=True)(d)
    SaveImaged("pred", output_dir=out, output_postfix="seg", separate_folder=False, resample=False,
               output_dtype=np.uint8, print_log=False)(d)


def child_medvit(scan: str, ckpt: str, out: str, probs: str | None, precision: str = "auto", crop: str = "auto") -> None:
    if probs:  # a separate, untimed run: the exact path's inverted probabilities
        from medvit.pipelines.io import read_scan
        from medvit.pipelines.segment import SegmentConfig, Segmenter

        seg = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32"))
        np.save(probs, seg.predict_proba(read_scan(scan)).numpy().astype(np.float32))
        return
    from medvit.cli.main import main

    main(["segment", scan, "--model", ckpt, "-o", out, "-q", "--precision", precision, "--body-crop", crop],
         standalone_mode=False)  # fmt: skip


def make_large_scan(source: Path, path: Path, shape: tuple[int, int, int] = (512, 512, 400)) -> Path:
    """The shared CT resampled (trilinear) onto a `shape` grid over the same field of view."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    img = nib.load(source)
    vol = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
    out = np.empty(shape, dtype=np.int16)
    step = 32  # k-slabs, so the float32 working set stays small
    for k0 in range(0, shape[2], step):
        k1 = min(k0 + step, shape[2])
        # sample the source at the centres of output slices k0..k1 (align_corners=False grid)
        z = (torch.arange(k0, k1, dtype=torch.float32) + 0.5) / shape[2] * vol.shape[-1] - 0.5
        lo, hi = int(z.min().floor().clamp(min=0)), int(z.max().ceil().clamp(max=vol.shape[-1] - 1)) + 1
        part = F.interpolate(vol[..., lo:hi], size=(shape[0], shape[1], hi - lo), mode="trilinear", align_corners=False)
        w = (z - lo).clamp(0, hi - lo - 1)
        i0 = w.floor().long()
        i1 = (i0 + 1).clamp(max=hi - lo - 1)
        f = (w - i0).view(1, 1, 1, 1, -1)
        slab = part[..., i0] * (1 - f) + part[..., i1] * f
        out[..., k0:k1] = slab[0, 0].round().clamp(-32768, 32767).numpy().astype(np.int16)
    # output voxel u sits at source voxel (u + 0.5) r - 0.5, r = source size / output size
    r = np.array(img.shape[:3]) / np.array(shape)
    affine = img.affine.copy()
    affine[:3, :3] = img.affine[:3, :3] @ np.diag(r)
    affine[:3, 3] = img.affine[:3, 3] + img.affine[:3, :3] @ (0.5 * r - 0.5)
    nib.save(nib.Nifti1Image(out, affine), path)
    return path


def run_child(side: str, *args: str) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, __file__, "--child", side, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def dice_per_label(a: np.ndarray, b: np.ndarray) -> dict[int, float]:
    out = {}
    for lab in range(1, NUM_CLASSES):
        s = (a == lab).sum() + (b == lab).sum()
        if s:
            out[lab] = float(2 * ((a == lab) & (b == lab)).sum() / s)
    return out


def crop_agreement(scan: str, ckpt: str, work: Path) -> None:
    """Windows over the body against windows over the whole grid, same checkpoint, fp32."""
    from medvit.pipelines.io import read_scan
    from medvit.pipelines.segment import SegmentConfig, Segmenter

    image = read_scan(scan)
    masks = {}
    for crop in ("auto", "none"):
        seg = Segmenter(ckpt, SegmentConfig(progress=False, precision="fp32", body_crop=crop))
        t0 = time.perf_counter()
        masks[crop] = seg.predict(image)
        run, full = seg.windows
        print(f"--body-crop {crop}: {run} of {full} windows, {time.perf_counter() - t0:.1f} s")
    a, b = masks["auto"], masks["none"]
    print(f"identical mask voxels (body crop vs whole grid): {(a == b).mean() * 100:.4f} %")
    labels = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    print("Dice per label (body crop vs whole grid): " + ", ".join(
        f"{lab}: {2 * ((a == lab) & (b == lab)).sum() / ((a == lab).sum() + (b == lab).sum()):.4f}" for lab in labels))


def agreement(scan: str, ckpt: str, work: Path) -> None:
    """Default path against the exact fp32 path, same trained checkpoint, separate processes."""
    import nibabel as nib

    stem = Path(scan).name.replace(".nii.gz", "").replace(".nii", "")
    masks = {}
    for precision in ("auto", "fp32"):
        r = run_child("medvit", scan, ckpt, str(work / precision), "", precision)
        print(f"medvit --precision {precision}: {r['wall_s']:6.1f} s wall, peak RSS {r['peak_rss_mb']:6.0f} MB")
        masks[precision] = np.asarray(nib.load(work / precision / f"{stem}_seg.nii.gz").dataobj)
    a, b = masks["auto"], masks["fp32"]
    print(f"identical mask voxels (default vs exact): {(a == b).mean() * 100:.4f} %")
    labels = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    print("Dice per label (default vs exact): " + ", ".join(
        f"{lab}: {2 * ((a == lab) & (b == lab)).sum() / ((a == lab).sum() + (b == lab).sum()):.4f}" for lab in labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", default=str(DATA / "ct" / "example_ct.nii.gz"))
    p.add_argument("--large", action="store_true", help="a synthetic 512x512x400 CT instead of --scan")
    p.add_argument("--fidelity", action="store_true", help="also compare inverted probabilities")
    p.add_argument("--agreement", metavar="CKPT", help="only compare default and exact paths of CKPT")
    p.add_argument("--crop-agreement", metavar="CKPT", help="only compare windows over the body with the whole grid")
    p.add_argument("--skip-reference", action="store_true", help="run only the medvit side")
    p.add_argument("--network", choices=sorted(NETWORKS), default="unetr", help="the MONAI reference network")
    p.add_argument("--work", default=None, help="folder for weights and masks (default: a temp dir)")
    p.add_argument("--child", choices=["monai", "medvit"], help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        scan, weights, out, probs, *extra = args.rest
        if args.child == "monai":
            child_monai(scan, weights, out, probs or None, *extra)
        else:
            child_medvit(scan, weights, out, probs or None, *extra)
        print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return

    import nibabel as nib
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="medvit_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    scan = args.scan
    if args.large:
        scan = str(make_large_scan(DATA / "ct" / "example_ct.nii.gz", work / "large_ct.nii"))
    if args.agreement:
        agreement(scan, args.agreement, work)
        return
    if args.crop_agreement:
        crop_agreement(scan, args.crop_agreement, work)
        return
    torch.manual_seed(0)
    weights = work / f"monai_{args.network}.pt"
    torch.save(monai_network(args.network).state_dict(), weights)
    ckpt = work / f"{args.network}.safetensors"
    subprocess.run([sys.executable, "-m", "medvit.cli", "convert", str(weights), "-o", str(ckpt), "--from", "monai",
                    "--model", NETWORKS[args.network], "--num-classes", str(NUM_CLASSES), "--spacing", *map(str, SPACING)],
                   check=True, capture_output=True)
    res = {}
    sides = (("monai", weights, args.network), ("medvit", ckpt, "auto"))
    if args.skip_reference:
        sides = sides[1:]
    for side, model_file, extra in sides:
        res[side] = run_child(side, scan, str(model_file), str(work / side), "", extra)
        print(f"{side:>6}: {res[side]['wall_s']:7.1f} s wall, peak RSS {res[side]['peak_rss_mb']:7.0f} MB", flush=True)
    print(f"scan {scan}, torch threads {torch.get_num_threads()}")
    if args.skip_reference:
        return
    if args.fidelity:  # untimed runs that also dump the inverted probabilities
        for side, model_file, extra in sides:
            run_child(side, scan, str(model_file), str(work / f"{side}_fidelity"), str(work / f"{side}_probs.npy"), extra)
    (monai_mask,), (medvit_mask,) = (list((work / side).glob("*_seg.nii.gz")) for side in ("monai", "medvit"))
    a, b = np.asarray(nib.load(monai_mask).dataobj), np.asarray(nib.load(medvit_mask).dataobj)
    print(f"shape {a.shape}" + ("" if a.shape == b.shape else f" (MONAI) against {b.shape} (medvit)"))
    print(f"speed ratio (MONAI / medvit): {res['monai']['wall_s'] / res['medvit']['wall_s']:.2f}x")
    print(f"peak RSS ratio (MONAI / medvit): {res['monai']['peak_rss_mb'] / res['medvit']['peak_rss_mb']:.2f}x")
    if a.shape != b.shape:
        return
    print(f"identical mask voxels: {(a == b).mean() * 100:.4f} %")
    d = dice_per_label(a, b)
    print("Dice per label (medvit vs MONAI): " + ", ".join(f"{k}: {v:.4f}" for k, v in d.items()))
    if args.fidelity:
        pa, pb = np.load(work / "monai_probs.npy"), np.load(work / "medvit_probs.npy")
        print(f"max |probability difference| after inversion: {np.abs(pa - pb).max():.2e}")
        print(f"fidelity masks identical: {bool((pa.argmax(0) == pb.argmax(0)).all())}")


if __name__ == "__main__":
    main()
