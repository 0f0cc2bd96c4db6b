"""A proxy for the unseen patient: build shifted copies of the labelled scan, segment them, score them.

Usage:
    python benchmarks/generalisation.py build -o PROXY [--holdout-slices 10] [--train-labels NAME ...]
    python benchmarks/generalisation.py segment PROXY -m RUN/last.safetensors -o MASKS [--segment-arg=--tta]
    python benchmarks/generalisation.py score PROXY MASKS --checkpoint CKPT | --nnunet-dataset dataset.json | --label ID=NAME ...

``build`` writes the proxy set (see ``_proxy.py``): the labelled scan
``../shared/data/ct/example_ct_sm.nii.gz`` in another contrast phase, with noise, blurred,
on a 0.8 x 0.8 x 2 mm grid, turned 10 degrees, cropped, stored LPS, all at once; its
held-out bottom slab; the full ``example_ct`` (82 unlabelled slices below the labels); and
``ct_patient3`` (another patient, aorta and T12 labelled). It also writes the MSD
datasets ``PROXY/train_full/dataset.json`` and ``PROXY/train_slab/dataset.json`` (the
labelled scan less the held-out slab) for ``medvit train``.

``segment`` runs ``medvit segment`` on ``PROXY/images`` (masks on each copy's own grid)
and scores the masks; ``score`` scores any tool's masks the same way, given the tool's
label ids. Both print the Dice table and the organ volumes off the labels, and write
the scores as JSON (``MASKS/proxy_scores.json`` unless ``--json`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _proxy import DATA, ORGANS, build_proxy_set, label_names
from _scoring import dice_table, score_masks, volume_table


def medvit_labels(checkpoint: Path) -> dict[int, str]:
    """Label id in `medvit segment`'s masks -> name, from the checkpoint's model card."""
    from medvit.pipelines.checkpoint import read_card

    return {int(k): v for k, v in read_card(checkpoint).label_names().items()}


def nnunet_labels(dataset_json: Path) -> dict[int, str]:
    """Label id in nnU-Net v2's masks -> name, from the dataset.json it was trained on."""
    labels = json.loads(dataset_json.read_text())["labels"]
    if any(not isinstance(v, int) for v in labels.values()):
        raise SystemExit(f"{dataset_json}: only plain integer labels are scored (no nnU-Net regions)")
    return {v: k for k, v in labels.items() if v != 0}


def parse_labels(items: list[str]) -> dict[int, str]:
    out = {}
    for item in items:
        key, sep, name = item.partition("=")
        if not sep or not key.isdigit() or not name:
            raise SystemExit(f"--label {item!r}: expected ID=NAME, e.g. 5=liver")
        out[int(key)] = name
    return out


def check_proxy(proxy: Path) -> None:
    if not (proxy / "proxy.json").is_file():
        raise SystemExit(f"{proxy}: no proxy.json; write the proxy set with `generalisation.py build -o {proxy}`")


def build(out: Path, holdout_slices: int, train_labels: tuple[str, ...]) -> dict:
    """The proxy set of the shared labelled scan, with the full CT and patient3."""
    if not (DATA / "ct" / "example_ct_sm.nii.gz").exists():
        raise SystemExit(f"shared data not found at {DATA}")
    t0 = time.perf_counter()
    manifest = build_proxy_set(
        out, DATA / "ct" / "example_ct_sm.nii.gz", DATA / "ct" / "example_seg.nii.gz", train_labels=train_labels,
        holdout_slices=holdout_slices, full_ct=DATA / "ct" / "example_ct.nii.gz", patient3=DATA / "ct_patient3",
    )
    print(f"proxy set in {out} ({time.perf_counter() - t0:.1f} s):")
    for case, info in manifest["cases"].items():
        print(f"  {case:13s} {info['description']}")
    print(f"training datasets: {manifest['train_full']}, {manifest.get('train_slab', '(no held-out slab)')}")
    return manifest


def medvit_segment(proxy: Path, checkpoint: Path, masks: Path, extra: list[str]) -> float:
    """`medvit segment PROXY/images -m CKPT -o MASKS` in a fresh process; its wall time."""
    cmd = [sys.executable, "-m", "medvit.cli", "segment", str(proxy / "images"), "-m", str(checkpoint),
           "-o", str(masks), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd)
    if done.returncode:
        raise SystemExit(f"medvit segment failed (exit {done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


def report(proxy: Path, masks: Path, labels: dict[int, str], tool: str, json_path: Path | None, **extra) -> dict:
    """Score `masks`, print the tables, write the JSON."""
    scores = {"tool": tool, **extra, **score_masks(proxy, masks, labels)}
    if scores["unknown_names"]:
        print(f"note: label names not in TotalSegmentator's map are not scored: {', '.join(scores['unknown_names'])}")
    names = (*ORGANS, *sorted(set(labels.values()) - set(ORGANS)))
    print(dice_table({tool: scores}, names))
    print(volume_table({tool: scores}))
    path = json_path or masks / "proxy_scores.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, indent=2) + "\n")
    print(f"scores: {path}")
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the proxy set")
    b.add_argument("-o", "--out", type=Path, required=True)
    b.add_argument("--holdout-slices", type=int, default=10, help="bottom slices held out of train_slab (0: none)")
    b.add_argument("--train-labels", nargs="+", default=list(ORGANS),
                   help="label names the training datasets ask for (add aorta vertebrae_T12 to score patient3)")
    s = sub.add_parser("segment", help="medvit segment the proxy set with a checkpoint, then score")
    s.add_argument("proxy", type=Path)
    s.add_argument("-m", "--model", type=Path, required=True, help="medvit checkpoint (.safetensors)")
    s.add_argument("-o", "--out", type=Path, required=True, help="folder for the masks")
    s.add_argument("--segment-arg", action="append", default=[], help="extra `medvit segment` argument (repeat)")
    s.add_argument("--json", type=Path, default=None)
    c = sub.add_parser("score", help="score a folder of masks from any tool")
    c.add_argument("proxy", type=Path)
    c.add_argument("masks", type=Path)
    how = c.add_mutually_exclusive_group(required=True)
    how.add_argument("--checkpoint", type=Path, help="medvit checkpoint whose card names the mask ids")
    how.add_argument("--nnunet-dataset", type=Path, help="nnU-Net v2 dataset.json whose labels name the mask ids")
    how.add_argument("--label", action="append", help="ID=NAME (repeat), TotalSegmentator names")
    c.add_argument("--tool", default=None, help="name shown in the table")
    c.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    if args.command == "build":
        unknown = sorted(set(args.train_labels) - set(label_names().values()))
        if unknown:
            raise SystemExit(f"--train-labels: unknown name(s) {', '.join(unknown)} (see {DATA / 'ct' / 'labels_total.json'})")
        build(args.out, args.holdout_slices, tuple(args.train_labels))
    elif args.command == "segment":
        check_proxy(args.proxy)
        seconds = medvit_segment(args.proxy, args.model, args.out, args.segment_arg)
        report(args.proxy, args.out, medvit_labels(args.model), "medvit", args.json,
               checkpoint=str(args.model), segment_seconds=round(seconds, 1))
    else:
        check_proxy(args.proxy)
        if not args.masks.is_dir():
            raise SystemExit(f"{args.masks}: no such folder of masks")
        if args.checkpoint:
            labels, tool = medvit_labels(args.checkpoint), "medvit"
        elif args.nnunet_dataset:
            labels, tool = nnunet_labels(args.nnunet_dataset), "nnU-Net"
        else:
            labels, tool = parse_labels(args.label), "masks"
        report(args.proxy, args.masks, labels, args.tool or tool, args.json)


if __name__ == "__main__":
    main()
