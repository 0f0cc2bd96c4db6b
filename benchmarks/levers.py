"""Training levers for transformers, each measured on the generalisation proxy.

Usage:
    python benchmarks/levers.py -o OUT [--only NAME ...] [--steps 1150] [--proxy PROXY] [--skip-baseline]
    python benchmarks/levers.py -o OUT --only unetr_mit_b0_2d_slab1 unetr_mit_b0_2d_slab1_dino --skip-baseline \
        --steps 400 --pretrain-steps 200      # self-supervised pretraining against scratch

Each lever is one `medvit train` run on the labelled scan (``PROXY/train_full``) with the
recommended CPU configuration (``train_real_ct.py``'s: segformer_b0, axial slabs of 3,
96x96 crops, 16 a step, lr 5e-4, the default recipe) and one change, for the same number
of steps; its last checkpoint segments the proxy set (``generalisation.py``), and the table
compares every lever with the baseline trained in the same run: the mean organ Dice on the
labelled scan, the mean and the worst over the 8 shifted copies, each organ's mean over the
copies, and the spleen predicted where there is none (the full CT below the labelled slab,
and the chest of ``ct_patient3``). Everything is written to ``OUT/levers.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _proxy import ORGANS
from _scoring import shifted_summary
from generalisation import build, check_proxy, medvit_labels, medvit_segment, report
from vs_nnunet import run_logged

BASE = ["--model", "segformer_b0", "--patch-size", "96", "96", "1", "--slab", "3", "--spacing", "3", "3", "3",
        "--samples-per-volume", "16", "--batch-size", "1", "--val-every", "300", "--lr", "5e-4"]

# lever -> the `medvit train` options it adds to BASE (a later option replaces an earlier one)
LEVERS: dict[str, list[str]] = {
    "baseline": [],
    "weight_decay_0.05": ["--weight-decay", "0.05"],
    "drop_path_0": ["--model-arg", "drop_path_rate=0.0"],
    "drop_path_0.2": ["--model-arg", "drop_path_rate=0.2"],
    "unetr_mit_b0_2d": ["--model", "unetr_mit_b0", "--model-arg", "spatial_dims=2"],
    "unetr_mit_b0_2d_deep_supervision": ["--model", "unetr_mit_b0", "--model-arg", "spatial_dims=2",
                                         "--deep-supervision"],
    # the same wall time as the other: UNETR-MiT's step costs about 3x SegFormer's on this CPU
    "baseline_3450_steps": ["--max-steps", "3450"],
    "unetr_mit_b0_2d_385_steps": ["--model", "unetr_mit_b0", "--model-arg", "spatial_dims=2", "--max-steps", "385"],
    # a plain CNN with the same recipe, then the baseline distilled from it (DeiT's hard-label rule)
    "cnn_unet_2d": ["--model", "unet_nnunet_2d"],
    "distilled_from_cnn": ["--teacher", "{out}/cnn_unet_2d/last.safetensors"],
    # self-supervised pretraining (DINO on the unlabelled full CT and DICOM series, axial
    # slices) of the same encoder, against it from scratch; one-channel slices (slab 1)
    "unetr_mit_b0_2d_slab1": ["--model", "unetr_mit_b0", "--model-arg", "spatial_dims=2", "--slab", "1"],
    "unetr_mit_b0_2d_slab1_dino": ["--model", "unetr_mit_b0", "--model-arg", "spatial_dims=2", "--slab", "1",
                                   "--init-encoder", "{out}/pretrain_dino/last.safetensors"],
}
PRETRAIN = ["--method", "dino", "--model", "unetr_mit_b0", "--model-arg", "spatial_dims=2", "--spatial-dims", "2",
            "--crop", "96", "96", "1", "--spacing", "3", "3", "3", "--batch-size", "8", "--lr", "1e-4"]


def pretrain(out: Path, steps: int) -> float:
    """DINO on the shared unlabelled scans (the full CT and the DICOM series); its wall time
    (0 when OUT already holds the pretrained encoder: it is reused)."""
    if (out / "pretrain_dino" / "last.safetensors").exists():
        return 0.0
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    cmd = [sys.executable, "-m", "medvit.cli", "pretrain", str(data / "ct" / "example_ct.nii.gz"),
           str(data / "ct_dicom"), "-o", str(out / "pretrain_dino"), "-q", *PRETRAIN, "--max-steps", str(steps)]
    seconds, _ = run_logged(cmd, out / "logs" / "pretrain_dino.log")
    return seconds


def run_lever(name: str, proxy: Path, out: Path, steps: int) -> dict:
    run = out / name
    options = [o.format(out=out) for o in LEVERS[name]]
    cmd = [sys.executable, "-m", "medvit.cli", "train", str(proxy / "train_full" / "dataset.json"), "-o", str(run),
           "-q", *BASE, "--max-steps", str(steps), *options]
    seconds, _ = run_logged(cmd, out / "logs" / f"{name}.log")
    checkpoint = run / "last.safetensors"
    masks = out / "masks" / name
    medvit_segment(proxy, checkpoint, masks, ["-q"])
    scores = report(proxy, masks, medvit_labels(checkpoint), name, None)
    return {"options": options, "train_seconds": round(seconds, 1), "summary": shifted_summary(scores),
            "full_ct_spleen_outside_ml": scores.get("full_ct_outside_slab", {}).get("spleen", {}).get(
                "predicted_outside_ml"),
            "patient3_spleen_ml": scores.get("patient3", {}).get("organs", {}).get("spleen", {}).get("predicted_ml")}


def table(results: dict[str, dict]) -> str:
    head = (f"{'lever':34s} {'train s':>7s} {'orig':>6s} {'mean8':>6s} {'worst':>6s} {'spleen':>6s} {'kid R':>6s} "
            f"{'kid L':>6s} {'liver':>6s} {'spleen ml: full CT':>18s} {'chest':>6s}")
    rows = [head, "-" * len(head)]
    for name, r in results.items():
        s, o = r["summary"], r["summary"]["per_organ"]
        rows.append(f"{name:34s} {r['train_seconds']:7.0f} {s['original']:6.3f} {s['mean']:6.3f} {s['worst']:6.3f} "
                    f"{o['spleen']:6.3f} {o['kidney_right']:6.3f} {o['kidney_left']:6.3f} {o['liver']:6.3f} "
                    f"{r['full_ct_spleen_outside_ml'] or 0:18.1f} {r['patient3_spleen_ml'] or 0:6.1f}")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--proxy", type=Path, default=None, help="an existing proxy set (default: OUT/proxy, built once)")
    p.add_argument("--only", nargs="+", choices=list(LEVERS), default=list(LEVERS),
                   help="levers to run, in this file's order (the baseline always runs first)")
    p.add_argument("--steps", type=int, default=1150)
    p.add_argument("--pretrain-steps", type=int, default=200, help="DINO steps before the *_dino lever")
    p.add_argument("--skip-baseline", action="store_true", help="do not train the baseline first")
    args = p.parse_args()
    proxy = args.proxy or args.out / "proxy"
    if not (proxy / "proxy.json").exists():
        build(proxy, 10, ORGANS)
    check_proxy(proxy)
    if "distilled_from_cnn" in args.only and "cnn_unet_2d" not in args.only:
        raise SystemExit("distilled_from_cnn needs its teacher: add cnn_unet_2d to --only")
    names = ([] if args.skip_baseline else ["baseline"]) + [n for n in LEVERS if n in args.only and n != "baseline"]
    if any(n.endswith("_dino") for n in names):
        print(f"DINO pretraining, {args.pretrain_steps} steps: {pretrain(args.out, args.pretrain_steps):.0f} s", flush=True)
    results = {name: run_lever(name, proxy, args.out, args.steps) for name in names}
    print(table(results))
    path = args.out / "levers.json"
    path.write_text(json.dumps({"steps": args.steps, "base_options": BASE, "levers": results}, indent=2) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
