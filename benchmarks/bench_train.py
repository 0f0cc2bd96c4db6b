"""Training throughput of `medvit train` against a MONAI training loop, and start-up and memory
against the number of cases.

  python benchmarks/bench_train.py                          # steps/s, UNETR-B and Swin-UNETR
  python benchmarks/bench_train.py --models unetr_base --patch 96 --steps 6
  python benchmarks/bench_train.py --scaling 4 16 64        # start-up and memory vs cases
  python benchmarks/bench_train.py --dice 200 --models unetr_base --patch 64 64 32

Throughput: each side trains in its own process on two copies of the shared CT (organ
labels spleen, kidneys, liver; 1.5 x 1.5 x 2 mm), the same crop size, batch (2 cases x 2 crops),
DiceCE and AdamW:
- MONAI: the loop MONAI's UNETR tutorial has a user write: LoadImaged ... CropForegroundd,
  CacheDataset, RandCropByPosNegLabeld, flips, 90-degree rotations, intensity shift, MONAI's
  DataLoader with the same number of workers, MONAI's UNETR / SwinUNETR, fp32; and the same
  loop with `persistent_workers=True` (the tutorial's loader restarts its workers every
  epoch, here every step), as "monai-persistent".
- medvit: `medvit train`'s pipeline (the Python API, validation left out), its defaults:
  the disk case cache (emptied first), the `default` recipe, worker processes, bf16 autocast
  where the CPU has it.
Reported: time from process start to the end of the first step, seconds per step after
`--warmup` steps, peak memory of the process and its workers (PSS, sampled every 0.5 s),
and medvit's steps per second over each MONAI loop's.

Dice: both sides train `--dice` steps on the proxy set's labelled scan (benchmarks/_proxy.py),
then `medvit segment --precision fp32` segments its 8 shifted copies with each side's
weights (MONAI's through `medvit convert`, whose inference equals MONAI's pipeline), scored
alike: the same Dice after the same number of steps is the goal.

Scaling: `medvit train` on N copies of the shared CT at 1 mm (segformer3d_b0, 3 steps),
against the same run with MONAI's CacheDataset preprocessing every case before the first
step (up to `--monai-max-cases`); time to the first step and peak PSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

T0 = time.perf_counter()
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
SM_SLICES = slice(82, 112)  # the slices of example_ct that example_seg labels (example_ct_sm)


# ---------------------------------------------------------------------------- the dataset
def write_dataset(out: Path, copies: int) -> Path:
    """`copies` of the shared CT, each with one voxel changed (a dataset refuses duplicates), with
    its organ labels (on slices 82-111, the reference's extent) as classes 1..4, MSD layout."""
    import nibabel as nib
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    ct = nib.load(DATA / "ct" / "example_ct.nii.gz")
    image = np.asarray(ct.dataobj)
    ref = np.asarray(nib.load(DATA / "ct" / "example_seg.nii.gz").dataobj)
    lab = np.zeros(image.shape, np.uint8)
    for cls, lid in enumerate(ORGANS, start=1):
        lab[:, :, SM_SLICES][ref == lid] = cls
    nib.save(nib.Nifti1Image(lab, ct.affine), out / "labels.nii")
    items = []
    for i in range(copies):
        img, lbl = out / f"case_{i:03d}.nii", out / f"case_{i:03d}_seg.nii"
        copy = image.copy()
        copy[0, 0, 0] += i + 1
        nib.save(nib.Nifti1Image(copy, ct.affine, ct.header), img)
        shutil.copyfile(out / "labels.nii", lbl)
        items.append({"image": str(img), "label": str(lbl)})
    ds = {"name": "bench", "modality": {"0": "CT"},
          "labels": {"0": "background", **{str(c): n for c, n in enumerate(ORGANS.values(), start=1)}},
          "training": items}  # fmt: skip
    (out / "dataset.json").write_text(json.dumps(ds))
    return out / "dataset.json"


# ---------------------------------------------------------------------------- the two sides
def run_monai(a: argparse.Namespace) -> dict:
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNETR, SwinUNETR
    from monai.transforms import (
        Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, MapLabelValued, Orientationd, RandCropByPosNegLabeld,
        RandFlipd, RandRotate90d, RandShiftIntensityd, ScaleIntensityRanged, Spacingd,
    )  # fmt: skip

    keys = ["image", "label"]
    patch = list(a.patch)
    spec = json.loads(Path(a.data).read_text())
    ids = sorted(int(k) for k in spec["labels"] if int(k))
    tf = Compose([
        LoadImaged(keys), EnsureChannelFirstd(keys),
        MapLabelValued("label", orig_labels=ids, target_labels=list(range(1, len(ids) + 1))),
        Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=a.spacing, mode=("bilinear", "nearest")),
        ScaleIntensityRanged("image", a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys, source_key="image"),
        RandCropByPosNegLabeld(keys, "label", spatial_size=patch, pos=1, neg=1, num_samples=2, image_key="image",
                               image_threshold=0),
        RandFlipd(keys, prob=0.1, spatial_axis=0), RandFlipd(keys, prob=0.1, spatial_axis=1),
        RandFlipd(keys, prob=0.1, spatial_axis=2), RandRotate90d(keys, prob=0.1, max_k=3),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ])  # fmt: skip
    root = Path(a.data).parent
    items = [{k: str(root / v) for k, v in item.items()} for item in spec["training"]]
    ds = CacheDataset(items, tf, cache_rate=1.0, num_workers=max(1, a.workers), progress=False)
    # the tutorial's loader restarts its workers every epoch; "monai-persistent" keeps them
    persistent = a.worker == "monai-persistent" and a.workers > 0
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=a.workers, persistent_workers=persistent)
    k = len(ids) + 1
    if a.model.startswith("swin_unetr"):
        model = SwinUNETR(in_channels=1, out_channels=k, feature_size=24 if a.model.endswith("small") else 48)
    elif a.model == "unetr_base":
        model = UNETR(1, k, patch, feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12, proj_type="conv",
                      norm_name="instance", res_block=True)  # fmt: skip
    else:
        import medvit

        model = medvit.create_model(a.model, img_size=tuple(patch), num_classes=k, in_chans=1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    model.train()
    times, total = [], a.warmup + a.steps
    while len(times) < total:
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - T0)
            if len(times) >= total:
                break
    if a.save:
        torch.save(model.state_dict(), a.save)
    return {"times": times, "crops": int(batch["image"].shape[0])}


def run_medvit(a: argparse.Namespace) -> dict:
    from medvit.pipelines.train import TrainConfig, Trainer

    times: list[float] = []
    step = Trainer._train_step

    def timed(self, batch):
        loss = step(self, batch)
        times.append(time.perf_counter() - T0)
        crops.append(int(batch["image"].shape[0]))
        return loss

    crops: list[int] = []
    Trainer._train_step = timed
    if not a.save:
        Trainer._end_of_epoch = lambda self, writer: None  # the MONAI loop does not validate either
    cfg = TrainConfig(
        data=a.data, out_dir=a.out, model=a.model, patch_size=tuple(a.patch), spacing=tuple(a.spacing),
        batch_size=2, samples_per_volume=2, max_steps=a.warmup + a.steps, val_fraction=None, fold="all",
        val_every=10**9,  # with --dice: validated and saved once, at the end
        folds=None, device="cpu", progress=False, workers=a.workers, cache_dir=a.cache, recipe=a.recipe,
    )
    trainer = Trainer(cfg)
    trainer.run()
    return {"times": times, "crops": crops[-1], "precision": str(trainer.amp_dtype or "float32").removeprefix("torch.")}


# ---------------------------------------------------------------------------- measuring
def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def measure(args: list[str]) -> dict:
    """Run this script as `--worker ...` and sample its process tree's PSS until it ends."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, sum(_pss_kb(p) for p in _tree(proc.pid)))
            time.sleep(0.5)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_mb"] = peak / 1024
    return result


def summary(r: dict, warmup: int) -> dict:
    t = r["times"]
    per_step = (t[-1] - t[warmup - 1]) / (len(t) - warmup) if len(t) > warmup else float("nan")
    return {"first_step_s": t[0], "s_per_step": per_step, "peak_mb": r["peak_mb"], "crops": r["crops"],
            "precision": r.get("precision", "float32")}  # fmt: skip


def default_workers() -> int:
    import torch

    from medvit.pipelines.train_data import default_workers as workers

    return workers(torch.device("cpu"))


def throughput(a: argparse.Namespace, work: Path) -> None:
    data = write_dataset(work / "ds", 2)
    workers = default_workers() if a.workers is None else a.workers
    print(f"{'x'.join(map(str, a.patch))} crops, 2 cases x 2 crops a step, {workers} worker(s), {a.steps} timed steps after "
          f"{a.warmup}; {os.cpu_count()} cores")  # fmt: skip
    print("| model | side | precision | first step | s/step | peak PSS | medvit's steps/s over this |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for model in a.models:
        common = ["--data", str(data), "--model", model, "--patch", *map(str, a.patch), "--steps", str(a.steps),
                  "--warmup", str(a.warmup), "--workers", str(workers), "--spacing", *map(str, a.spacing)]  # fmt: skip
        rows = {}
        for side in a.sides:
            cache = work / f"cache_{model}"
            shutil.rmtree(cache, ignore_errors=True)
            extra = ["--out", str(work / f"run_{model}"), "--cache", str(cache)]
            rows[side] = summary(measure(["--worker", side, *common, *extra]), a.warmup)
        for side, r in rows.items():
            ratio = r["s_per_step"] / rows["medvit"]["s_per_step"] if "medvit" in rows else float("nan")
            print(f"| {model} | {side} | {r['precision']} | {r['first_step_s']:.1f} s | {r['s_per_step']:.2f} | "
                  f"{r['peak_mb']:.0f} MB | {ratio:.2f}x |", flush=True)  # fmt: skip


def scaling(a: argparse.Namespace, work: Path) -> None:
    print(f"segformer3d_b0, 1 mm, {'x'.join(map(str, a.patch))} crops, 3 steps; time from process start to the end of the first step")
    print("| cases | medvit cold cache | medvit warm cache | medvit peak PSS | MONAI CacheDataset | MONAI peak PSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    workers = default_workers() if a.workers is None else a.workers
    for n in a.scaling:
        data = write_dataset(work / f"ds{n}", n)
        common = ["--data", str(data), "--model", "segformer3d_b0", "--patch", *map(str, a.patch), "--steps", "2",
                  "--warmup", "1", "--workers", str(workers), "--spacing", "1", "1", "1"]  # fmt: skip
        cache = work / f"cache{n}"
        shutil.rmtree(cache, ignore_errors=True)
        extra = ["--out", str(work / f"run{n}"), "--cache", str(cache)]
        cold = summary(measure(["--worker", "medvit", *common, *extra]), 1)
        warm = summary(measure(["--worker", "medvit", *common, *extra]), 1)
        monai = "not run"
        if n <= a.monai_max_cases:
            m = summary(measure(["--worker", "monai", *common, *extra]), 1)
            monai = f"{m['first_step_s']:.1f} s | {m['peak_mb']:.0f} MB"
        else:
            monai = "not run | -"
        print(f"| {n} | {cold['first_step_s']:.1f} s | {warm['first_step_s']:.1f} s | "
              f"{max(cold['peak_mb'], warm['peak_mb']):.0f} MB | {monai} |", flush=True)  # fmt: skip
        shutil.rmtree(work / f"ds{n}", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


def dice(a: argparse.Namespace, work: Path) -> None:
    """Both sides trained the same steps, then segmented by `medvit segment` in fp32 (the MONAI
    side's weights through `medvit convert`, whose pipeline equals MONAI's), scored alike."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _proxy import ORGANS as NAMES
    from _scoring import score_masks, shifted_summary
    from generalisation import build, medvit_labels, medvit_segment

    from medvit.pipelines.convert_weights import ConvertConfig, convert

    proxy = work / "proxy"
    data = Path(build(proxy, 0, NAMES)["train_full"])
    workers = default_workers() if a.workers is None else a.workers
    spec = json.loads(data.read_text())
    names = [spec["labels"][str(i)] for i in sorted(int(k) for k in spec["labels"] if int(k))]
    print(f"| model | side | precision | steps | train s | original | mean of 8 copies | worst copy | "
          f"{' | '.join(names)} |")  # fmt: skip
    print("| --- " * (8 + len(names)) + "|")
    for model in a.models:
        common = ["--data", str(data), "--model", model, "--patch", *map(str, a.patch), "--steps", str(a.dice),
                  "--warmup", "0", "--workers", str(workers), "--spacing", *map(str, a.spacing),
                  "--recipe", a.recipe]  # fmt: skip
        for side in [s for s in a.sides if s != "monai-persistent"]:
            run, cache = work / f"run_{side}_{model}", work / f"cache_{model}"
            save = work / f"monai_{model}.pt" if side == "monai" else run / "last.safetensors"
            r = measure(["--worker", side, *common, "--out", str(run), "--cache", str(cache), "--save", str(save)])
            ckpt = save
            if side == "monai":
                ckpt, _ = convert(save, work / f"monai_{model}.safetensors", ConvertConfig(
                    source="monai", model=model, num_classes=len(names) + 1, img_size=a.patch,
                    spacing=a.spacing, intensity="ct", ct_window=(-175.0, 250.0), labels=names,
                ))  # fmt: skip
            masks = work / f"masks_{side}_{model}"
            medvit_segment(proxy, ckpt, masks, ["-q", "--precision", "fp32"])
            s = shifted_summary(score_masks(proxy, masks, medvit_labels(ckpt)), tuple(names))
            organs = " | ".join(f"{s['per_organ'][n]:.3f}" for n in names)
            what = side if side == "monai" else f"{side} ({a.recipe})"
            print(f"| {model} | {what} | {r.get('precision', 'float32')} | {a.dice} | {r['times'][-1]:.0f} | "
                  f"{s['original']:.3f} | {s['mean']:.3f} | {s['worst']:.3f} | {organs} |", flush=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["unetr_base", "swin_unetr_small"])
    p.add_argument("--patch", type=int, nargs="+", default=[96], help="crop size: one edge, or X Y Z")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="[default: medvit's default on this machine]")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.0))
    p.add_argument("--scaling", type=int, nargs="+", default=None, metavar="N")
    p.add_argument("--monai-max-cases", type=int, default=16)
    p.add_argument("--sides", nargs="+", choices=["monai", "monai-persistent", "medvit"],
                   default=["monai", "monai-persistent", "medvit"], help="which sides to run (--dice: not monai-persistent)")
    p.add_argument("--worker", choices=["monai", "monai-persistent", "medvit"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    p.add_argument("--recipe", default="default", help="medvit's training recipe (default: `medvit train`'s)")
    p.add_argument("--dice", type=int, default=None, metavar="STEPS",
                   help="train both sides STEPS steps on the proxy set's labelled scan and score them on its copies")
    a = p.parse_args()
    a.patch = a.patch * 3 if len(a.patch) == 1 else a.patch
    if len(a.patch) != 3:
        p.error("--patch takes one edge or three")
    if a.worker:
        result = run_medvit(a) if a.worker == "medvit" else run_monai(a)
        print(json.dumps(result))
        return
    if not (DATA / "ct" / "example_ct.nii.gz").exists():
        raise SystemExit(f"shared data not found at {DATA}")
    work = Path(tempfile.mkdtemp(prefix="medvit_bench_train_"))
    try:
        if a.dice:
            dice(a, work)
        else:
            scaling(a, work) if a.scaling else throughput(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
