"""Classification recipes on the shared real CT: baseline vs DeiT's recipe vs DeiT + SAM.

Usage: python benchmarks/classify_real_ct.py [--recipes baseline deit deit+sam] [--steps 300]

Two tasks, both trained through `medvit train` / `medvit predict` on the one labelled scan
(`example_ct_sm.nii.gz`) and scored on the proxy's shifted copies of it (another contrast
phase, noise, blur, a finer grid, a rotation, a smaller field of view, LPS storage, and all
at once: `benchmarks/_proxy.py`), which no model sees in training:

- **3D patches**: 48 mm cubes centred in the liver, the spleen, a kidney, or elsewhere in
  the body (background), 40 per class from the training scan (the same number per class
  from each shifted copy for testing); a ViT on 16^3 inputs (`vit_tiny_patch16_224` with
  `spatial_dims=3`, 4^3 patches, width 96, depth 4).
- **2D slices**: every axial slice, labelled by whether it shows a kidney; a ViT on 64 x 64
  slices (8 x 8 patches, width 96, depth 4).

Each recipe trains for the same number of steps (batch 32, 20 % of the training items for
validation). Printed per task and recipe: training time, validation balanced accuracy, and
on the shifted copies accuracy, balanced accuracy and macro AUROC (all copies pooled) and
the worst copy's balanced accuracy.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proxy import DATA, build_proxy_set, label_names  # noqa: E402

from medvit.pipelines.checkpoint import read_card  # noqa: E402
from medvit.pipelines.classify_metrics import classification_metrics  # noqa: E402

RECIPES = {
    "baseline": ["--recipe", "baseline"],
    "deit": ["--recipe", "deit"],
    "deit+sam": ["--recipe", "deit", "--sam", "sam"],
}
PATCH_MM = 48.0
PER_CLASS = 40
ORGANS3D = {"liver": ("liver",), "spleen": ("spleen",), "kidney": ("kidney_right", "kidney_left")}
MODEL = ["--model", "vit_tiny_patch16_224", "--model-arg", "embed_dim=96", "--model-arg", "depth=4",
         "--model-arg", "num_heads=3"]  # fmt: skip


def _ids(names: dict[int, str], wanted: tuple[str, ...]) -> list[int]:
    return [i for i, n in names.items() if n in wanted]


def patches(image: Path, label: Path, out: Path, seed: int, names: dict[int, str]) -> int:
    """`PER_CLASS` organ-centred cubes per class of one scan, saved as `out/<class>/*.nii.gz`."""
    img, lab = nib.load(str(image)), nib.load(str(label))
    x, y = np.asarray(img.dataobj, dtype=np.float32), np.asarray(lab.dataobj)
    spacing = np.linalg.norm(img.affine[:3, :3], axis=0)
    half = np.maximum(1, np.round(PATCH_MM / 2 / spacing).astype(int))
    rng = np.random.default_rng(seed)
    organ = np.isin(y, _ids(names, sum(ORGANS3D.values(), ())))
    classes = {c: np.isin(y, _ids(names, ids)) for c, ids in ORGANS3D.items()}
    classes["background"] = (x > -300) & ~organ
    made = 0
    for c, where in classes.items():
        (out / c).mkdir(parents=True, exist_ok=True)
        inside = np.zeros_like(where)
        inside[half[0]:-half[0], half[1]:-half[1], half[2]:-half[2]] = True  # fmt: skip
        centres = np.argwhere(where & inside)
        if c == "background":  # well away from the organs: under 10 % organ in the cube
            centres = centres[rng.permutation(len(centres))[: 50 * PER_CLASS]]
            centres = [p for p in centres if organ[tuple(slice(v - h, v + h) for v, h in zip(p, half))].mean() < 0.1]
            centres = np.array(centres)
        for n, p in enumerate(centres[rng.choice(len(centres), min(PER_CLASS, len(centres)), replace=False)]):
            box = tuple(slice(v - h, v + h) for v, h in zip(p, half))
            nib.save(nib.Nifti1Image(x[box], img.affine), str(out / c / f"{image.name[:-7]}_{n:03d}.nii.gz"))
            made += 1
    return made


def slices(image: Path, label: Path, out: Path, names: dict[int, str]) -> int:
    """Every axial slice as a 2D NIfTI under `out/kidney` or `out/no_kidney`."""
    img, lab = nib.load(str(image)), nib.load(str(label))
    x, y = np.asarray(img.dataobj, dtype=np.float32), np.asarray(lab.dataobj)
    axis = int(np.argmax(np.abs(img.affine[2, :3])))  # the voxel axis closest to S-I
    kidney = np.isin(y, _ids(names, ORGANS3D["kidney"]))
    for c in ("kidney", "no_kidney"):
        (out / c).mkdir(parents=True, exist_ok=True)
    for k in range(x.shape[axis]):
        c = "kidney" if np.take(kidney, k, axis).any() else "no_kidney"
        nib.save(nib.Nifti1Image(np.take(x, k, axis), np.eye(4)), str(out / c / f"{image.name[:-7]}_{k:03d}.nii.gz"))
    return x.shape[axis]


def medvit(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "medvit.cli", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"medvit {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def score(preds: Path, test: Path) -> tuple[dict, float]:
    """Pooled metrics over the shifted copies, and the worst copy's balanced accuracy."""
    rows = list(csv.DictReader(preds.open()))
    classes = [c[2:] for c in rows[0] if c.startswith("p_")]
    truth = np.array([classes.index(Path(r["path"]).parent.name) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    copy = np.array([Path(r["path"]).parent.parent.name for r in rows])
    pooled = classification_metrics(probs, truth, classes)
    worst = min(classification_metrics(probs[copy == c], truth[copy == c], classes)["balanced_accuracy"]
                for c in sorted(set(copy)))  # fmt: skip
    return pooled, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tasks", nargs="+", default=["3d", "2d"], choices=["3d", "2d"])
    args = parser.parse_args()
    if not DATA.exists():
        sys.exit(f"shared real scans not found at {DATA}")
    work = Path(tempfile.mkdtemp(prefix="medvit-classify-"))
    try:
        proxy = work / "proxy"
        manifest = build_proxy_set(proxy, DATA / "ct" / "example_ct_sm.nii.gz", DATA / "ct" / "example_seg.nii.gz",
                                   holdout_slices=0)  # fmt: skip
        names = label_names()
        copies = [n for n, c in manifest["cases"].items() if not c["seen"]]
        tasks = {
            "3d": (patches, ["--input-size", "16x16x16", "--model-arg", "patch_size=4"]),
            "2d": (slices, ["--input-size", "64x64", "--model-arg", "patch_size=8"]),
        }
        print(f"shifted copies scored: {', '.join(copies)}; {args.steps} steps per run, batch 32")
        print(f"{'task':<4} {'recipe':<10} {'train s':>8} {'val bal':>8} {'test acc':>9} {'test bal':>9} "
              f"{'AUROC':>6} {'worst bal':>10}")  # fmt: skip
        for task in args.tasks:
            make, opts = tasks[task]
            train, test = work / task / "train", work / task / "test"

            def build(case: str, out: Path, seed: int) -> None:
                image, label = proxy / "images" / f"{case}.nii.gz", proxy / "labels" / f"{case}.nii.gz"
                make(image, label, out, seed, names) if make is patches else make(image, label, out, names)

            build("original", train, 0)
            for i, c in enumerate(copies):
                build(c, test / c, 1 + i)
            for recipe in args.recipes:
                run = work / task / recipe
                start = time.perf_counter()
                medvit("train", train, "-o", run, *MODEL, *opts, *RECIPES[recipe], "--max-steps", args.steps,
                       "--batch-size", "32", "--device", "cpu", "-q")  # fmt: skip
                seconds = time.perf_counter() - start
                val = read_card(run / "last.safetensors").extra["metrics"]["balanced_accuracy"]
                preds = run / "test.csv"
                medvit("predict", *[test / c for c in copies], "-m", run / "last.safetensors", "-o", preds, "-q")
                pooled, worst = score(preds, test)
                auroc = pooled["auroc_macro"]
                print(f"{task:<4} {recipe:<10} {seconds:8.0f} {val:8.3f} {pooled['accuracy']:9.3f} "
                      f"{pooled['balanced_accuracy']:9.3f} {auroc if auroc is None else round(auroc, 3)!s:>6} "
                      f"{worst:10.3f}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
