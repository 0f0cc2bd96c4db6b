"""nnU-Net v2 and medvit side by side: same training data, same wall-clock budget, same proxy set, same scorer.

Usage:
    python benchmarks/vs_nnunet.py -o OUT [--budget-min 12] [--configurations 3d_fullres] [--train-slab]
    python benchmarks/vs_nnunet.py -o /tmp/tiny --budget-min 2 --configurations 2d \\
        --nnunet-trainer nnUNetTrainer_1epoch --nnunet-disable-tta \\
        --medvit-arg=--max-steps --medvit-arg=20            # a tiny check that everything runs

nnU-Net v2 lives in its own virtual environment (``--nnunet-python``, default
``/work/venv-nnunet/bin/python``; created with ``pip install nnunetv2`` when missing) and
is only ever run as its commands, on the CPU (``-device cpu``). Steps, each timed:

1. the proxy set (``generalisation.py build``) in ``OUT/proxy`` unless ``--proxy`` names one;
2. an nnU-Net raw dataset ``Dataset<id>_MedvitProxy``: the labelled scan (or, with
   ``--train-slab``, the scan less its held-out slab) with spleen, kidneys and liver as
   contiguous labels 1-4; ``nnUNetv2_plan_and_preprocess``;
3. ``nnUNetv2_train <id> <configuration> all -tr <trainer> -device cpu`` for each
   configuration, stopped at the budget if it is still running (its newest checkpoint is
   then used: ``checkpoint_final.pth`` if it finished, else ``checkpoint_best.pth``, which
   nnU-Net writes after every epoch that improves its running Dice, or ``checkpoint_latest.pth``);
4. ``medvit train`` with its defaults on the SAME dataset.json, stopped at the same budget
   (``last.safetensors``, written after every validation, is used);
5. ``nnUNetv2_predict`` and ``medvit segment`` on every proxy image, each tool's defaults;
6. both scored by ``_scoring.score_masks``; one table side by side and ``OUT/vs_nnunet.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from medvit.pipelines.atomic import write_atomic
from medvit.pipelines.io import read_scan, write_mask

from _proxy import DATA, ORGANS, json_atomic, label_names
from _scoring import dice_table, score_masks, volume_table
from generalisation import build, medvit_labels

DEFAULT_NNUNET_PYTHON = Path("/work/venv-nnunet/bin/python")
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth", "checkpoint_latest.pth")


def run_logged(cmd: list[str], log: Path, env: dict | None = None, budget_s: float | None = None) -> tuple[float, bool]:
    """Run `cmd` with its output in `log`; stop its whole process group at the budget.

    Returns:
        (wall seconds, whether it was stopped at the budget).

    Raises:
        SystemExit: the command failed on its own (the log's last lines are printed).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(cmd)}   (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        # Its own process group: nnU-Net's augmentation workers are children that must stop with it.
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
            stopped = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, stopped = 0, True
    seconds = time.perf_counter() - t0
    if rc:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{cmd[0]} failed (exit {rc}) after {seconds:.0f} s; end of {log}:\n{tail}")
    return seconds, stopped


def step(cmd: list[str], log: Path, env: dict | None = None, budget_s: float | None = None,
         skip: bool = False) -> tuple[float | None, bool]:
    """`run_logged`, or nothing when `skip` (`--reuse` and the result is there): (seconds or None, stopped)."""
    if skip:
        print(f"reusing the result of: {' '.join(cmd)}")
        return None, False
    seconds, stopped = run_logged(cmd, log, env, budget_s)
    return round(seconds, 1), stopped


def ensure_nnunet(python: Path, log: Path) -> dict:
    """nnU-Net v2 in its own virtual environment: created and installed when missing; import checked."""
    info: dict = {"python": str(python)}
    if not python.exists():
        venv = python.parent.parent
        if python != venv / "bin" / "python":
            raise SystemExit(f"--nnunet-python {python}: no such interpreter (give <venv>/bin/python to create one)")
        base = Path(getattr(sys, "_base_executable", sys.executable))
        info["venv_seconds"] = round(run_logged([str(base), "-m", "venv", str(venv)], log.with_name("venv.log"))[0], 1)
        info["install_seconds"] = round(run_logged([str(python), "-m", "pip", "install", "nnunetv2"], log)[0], 1)
    out = subprocess.run([str(python), "-c", "import nnunetv2, torch; from importlib.metadata import version; "
                          "print(version('nnunetv2'), torch.__version__)"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{python}: nnunetv2 does not import:\n{out.stderr.strip()[-2000:]}")
    info["nnunetv2"], info["torch"] = out.stdout.split()
    for tool in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict"):
        if not (python.parent / tool).exists():
            raise SystemExit(f"{python.parent / tool}: missing; is nnunetv2 installed in that environment?")
    return info


_SHORT_TRAINER = """\
# Written by medvit's benchmarks/vs_nnunet.py: nnU-Net's own trainer on a shorter schedule.
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = {epochs}
        self.num_iterations_per_epoch = {iterations}
        self.num_val_iterations_per_epoch = {val_iterations}
"""


def short_schedule_trainer(python: Path, epochs: int, iterations: int, val_iterations: int) -> str:
    """The name of nnU-Net's trainer with only its schedule shortened (`epochs` x `iterations`),
    written into nnU-Net's own environment, where `nnUNetv2_train -tr` finds trainers by name.
    Nothing of nnU-Net's changes but these three numbers (the poly LR decays over `epochs`)."""
    name = f"nnUNetTrainer_{epochs}x{iterations}v{val_iterations}"
    where = subprocess.run([str(python), "-c", "import nnunetv2, os; print(os.path.dirname(nnunetv2.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    path = Path(where) / "training" / "nnUNetTrainer" / "variants" / "training_length" / f"{name}.py"
    path.write_text(_SHORT_TRAINER.format(name=name, epochs=epochs, iterations=iterations, val_iterations=val_iterations))
    return name


def write_raw_dataset(root: Path, dataset_id: int, manifest: dict, slab: bool) -> tuple[Path, dict[int, str]]:
    """The training scan as an nnU-Net v2 raw dataset with contiguous labels; returns (dataset.json, id -> name)."""
    source = Path(manifest["train_slab" if slab else "train_full"]).parent
    folder = root / f"Dataset{dataset_id:03d}_MedvitProxy"
    names = list(manifest["train_labels"])
    ids = {v: k for k, v in label_names().items()}
    scan = read_scan(source / "image.nii.gz")
    ref = np.asarray(read_scan(source / "label.nii.gz").array)
    lut = np.zeros(max(int(ref.max()), max(ids[n] for n in names)) + 1, np.uint8)
    for i, name in enumerate(names, 1):
        lut[ids[name]] = i
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    image = folder / "imagesTr" / "proxy_000_0000.nii.gz"
    write_atomic(image, lambda tmp: tmp.write_bytes((source / "image.nii.gz").read_bytes()))
    write_mask(lut[ref], scan, folder / "labelsTr" / "proxy_000.nii.gz")  # on the image's own grid
    ds = {"name": folder.name, "channel_names": {"0": "CT"},
          "labels": {"background": 0, **{n: i for i, n in enumerate(names, 1)}},
          "numTraining": 1, "file_ending": ".nii.gz"}
    json_atomic(ds, folder / "dataset.json")
    return folder / "dataset.json", {i: n for i, n in enumerate(names, 1)}


def nnunet_inputs(proxy: Path, folder: Path) -> Path:
    """nnU-Net's input naming (<case>_0000.nii.gz) as links to the proxy images."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in sorted((proxy / "images").glob("*.nii.gz")):
        link = folder / image.name.replace(".nii.gz", "_0000.nii.gz")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(image.resolve())
    return folder


def newest_checkpoint(folder: Path) -> Path | None:
    for name in CHECKPOINTS:
        if (folder / name).exists():
            return folder / name
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--budget-min", type=float, default=12.0, help="training wall clock per tool (and per nnU-Net configuration)")
    p.add_argument("--configurations", nargs="+", default=["3d_fullres"], choices=["2d", "3d_fullres", "3d_lowres"])
    p.add_argument("--proxy", type=Path, default=None, help="an existing proxy set (default: build OUT/proxy)")
    p.add_argument("--train-slab", action="store_true", help="train both on the scan less its held-out slab")
    p.add_argument("--dataset-id", type=int, default=901)
    p.add_argument("--nnunet-python", type=Path, default=DEFAULT_NNUNET_PYTHON)
    p.add_argument("--nnunet-trainer", default="nnUNetTrainer",
                   help="a stock trainer, e.g. nnUNetTrainer_5epochs (default: nnU-Net's own, stopped at the budget)")
    p.add_argument("--nnunet-schedule", type=int, nargs=3, metavar=("EPOCHS", "ITERATIONS", "VAL_ITERATIONS"),
                   help="nnU-Net's trainer with a shorter schedule (e.g. 30 50 10: 30 epochs of 50 iterations, 10 "
                        "validation iterations each), written into its environment; overrides --nnunet-trainer")
    p.add_argument("--nnunet-disable-tta", action="store_true", help="no mirroring at prediction (nnU-Net's default is on)")
    p.add_argument("--medvit-arg", action="append", default=[], help="extra `medvit train` argument (repeat); none: its defaults")
    p.add_argument("--segment-arg", action="append", default=[], help="extra `medvit segment` argument (repeat)")
    p.add_argument("--reuse", action="store_true",
                   help="keep what OUT already has (plans, checkpoints) and only predict and score again")
    args = p.parse_args()
    if not (DATA / "ct" / "example_ct_sm.nii.gz").exists():
        raise SystemExit(f"shared data not found at {DATA}")
    out: Path = args.out.resolve()
    budget = args.budget_min * 60.0
    logs = out / "logs"
    report: dict = {"budget_s": budget, "train_slab": args.train_slab, "configurations": args.configurations,
                    "nnunet_trainer": args.nnunet_trainer, "medvit_args": args.medvit_arg, "cpus": os.cpu_count()}

    t0 = time.perf_counter()
    report["nnunet_env"] = ensure_nnunet(args.nnunet_python, logs / "nnunet_install.log")
    report["nnunet_env"]["check_seconds"] = round(time.perf_counter() - t0, 1)
    if args.nnunet_schedule:
        args.nnunet_trainer = short_schedule_trainer(args.nnunet_python, *args.nnunet_schedule)
        report["nnunet_trainer"] = args.nnunet_trainer
    proxy = args.proxy.resolve() if args.proxy else out / "proxy"
    manifest = json.loads((proxy / "proxy.json").read_text()) if (proxy / "proxy.json").exists() else build(
        proxy, 10, ORGANS)
    if args.train_slab and "train_slab" not in manifest:
        raise SystemExit(f"{proxy}: built without a held-out slab; rebuild it with --holdout-slices")

    nn = out / "nnunet"
    env = {**os.environ, "nnUNet_raw": str(nn / "raw"), "nnUNet_preprocessed": str(nn / "preprocessed"),
           "nnUNet_results": str(nn / "results")}
    dataset_json, nn_labels = write_raw_dataset(nn / "raw", args.dataset_id, manifest, args.train_slab)
    bin_ = args.nnunet_python.parent
    planned = (nn / "preprocessed" / dataset_json.parent.name / "nnUNetPlans.json").exists()
    # one training case: more worker processes than one only add start-up time
    plan = [str(bin_ / "nnUNetv2_plan_and_preprocess"), "-d", str(args.dataset_id), "-c", *args.configurations,
            "--verify_dataset_integrity", "-npfp", "1", "-np", "1"]
    report["nnunet_plan_and_preprocess_s"] = step(plan, logs / "nnunet_plan.log", env, None, args.reuse and planned)[0]

    results: dict[str, dict] = {}
    runs: dict[str, dict] = {}
    inputs = nnunet_inputs(proxy, nn / "input")
    for config in args.configurations:
        name = f"nnU-Net {config}"
        folder = nn / "results" / dataset_json.parent.name / f"{args.nnunet_trainer}__nnUNetPlans__{config}" / "fold_all"
        train = [str(bin_ / "nnUNetv2_train"), str(args.dataset_id), config, "all", "-tr", args.nnunet_trainer,
                 "-device", "cpu"]
        seconds, stopped = step(train, logs / f"nnunet_train_{config}.log", env, budget,
                                args.reuse and newest_checkpoint(folder) is not None)
        ckpt = newest_checkpoint(folder)
        runs[name] = {"train_s": seconds, "stopped_at_budget": stopped, "checkpoint": str(ckpt) if ckpt else None}
        if ckpt is None:
            print(f"{name}: no checkpoint within the budget (no epoch of 250 iterations finished); not scored. "
                  "A longer --budget-min or the 2d configuration gets one.")
            continue
        masks = out / "masks" / f"nnunet_{config}"
        predict = [str(bin_ / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(masks), "-d", str(args.dataset_id),
                   "-c", config, "-f", "all", "-tr", args.nnunet_trainer, "-chk", ckpt.name, "-device", "cpu"]
        predict += ["--disable_tta"] if args.nnunet_disable_tta else []
        predicted = masks.is_dir() and len(list(masks.glob("*.nii.gz"))) == len(list(inputs.glob("*.nii.gz")))
        runs[name]["predict_s"] = step(predict, logs / f"nnunet_predict_{config}.log", env, None,
                                       args.reuse and predicted)[0]
        results[name] = score_masks(proxy, masks, nn_labels)

    medvit = out / "medvit_run"
    ckpt = medvit / "last.safetensors"
    train = [sys.executable, "-m", "medvit.cli", "train", str(dataset_json), "-o", str(medvit), *args.medvit_arg]
    seconds, stopped = step(train, logs / "medvit_train.log", None, budget, args.reuse and ckpt.exists())
    runs["medvit"] = {"train_s": seconds, "stopped_at_budget": stopped, "checkpoint": str(ckpt) if ckpt.exists() else None}
    if ckpt.exists():
        masks = out / "masks" / "medvit"
        segment = [sys.executable, "-m", "medvit.cli", "segment", str(proxy / "images"), "-m", str(ckpt),
                   "-o", str(masks), *args.segment_arg]
        runs["medvit"]["predict_s"] = step(segment, logs / "medvit_segment.log")[0]
        results["medvit"] = score_masks(proxy, masks, medvit_labels(ckpt))
    else:
        print("medvit: no checkpoint within the budget (no validation reached); not scored")

    report["runs"], report["scores"] = runs, results
    (out / "vs_nnunet.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nnnU-Net {report['nnunet_env']['nnunetv2']} (torch {report['nnunet_env']['torch']}), "
          f"plan and preprocess {report['nnunet_plan_and_preprocess_s'] or 'reused'} s; training budget {budget:.0f} s per tool")
    for name, run in runs.items():
        trained = "reused" if run["train_s"] is None else f"trained {run['train_s']:.1f} s"
        print(f"  {name:18s} {trained}{' (stopped at the budget)' if run['stopped_at_budget'] else ''}, "
              f"predicted the proxy set in {run.get('predict_s', 'n/a')} s; checkpoint {run['checkpoint']}")
    if results:
        print(dice_table(results))
        print(volume_table(results))
    print(f"report: {out / 'vs_nnunet.json'}")


if __name__ == "__main__":
    main()
