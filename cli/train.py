"""`medvit train`: train a segmentation model on a dataset, or a classifier on labelled images,
volumes or clips (the data says which)."""

from __future__ import annotations

from pathlib import Path

import click

from medvit.cli._common import device_option, model_arg_option, terminate_unwinds, user_errors
from medvit.pipelines.preprocessing import DEFAULT_SPACING, INTENSITY_PRESETS
from medvit.pipelines.recipes import recipe_names


@click.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Run folder: checkpoints, TensorBoard logs (tb/), config.json, splits.json.")
@click.option("--model", "-m", default=None,
              help="Registered model name [default: unetr_base; classification: deit_tiny_patch16_224].")
@model_arg_option()
@click.option("--epochs", type=int, default=None,
              help="Passes over the training cases [default: 100, or as many as --max-steps takes].")
@click.option("--max-steps", type=int, default=None,
              help="Train this many optimiser steps (with --epochs: whichever ends first).")
@click.option("--patch-size", nargs=3, type=int, default=(96, 96, 96), show_default=True,
              help="Window size in voxels (x y z); for a 2D model the entry along --slice-axis is ignored.")
@click.option("--slice-axis", type=click.Choice(["axial", "coronal", "sagittal"]), default="axial",
              show_default=True, help="2D models: the slices they are trained on (and segment).")
@click.option("--slab", default=1, show_default=True,
              help="2D models: odd number of neighbouring slices given as input channels.")
@click.option("--spacing", nargs=3, type=float, default=DEFAULT_SPACING, show_default=True,
              help="Target voxel size in mm (ignored for a preprocessed folder).")
@click.option("--intensity", type=click.Choice(INTENSITY_PRESETS), default=None,
              help="Intensity preset (default: from the dataset's modality); ct-fingerprint: clip to the "
              "training foreground's 0.5/99.5 percentiles and z-score (nnU-Net's CT scheme).")
@click.option("--recipe", default=None,
              help=f"Training recipe [default: default; classification: deit]. Segmentation (augmentation, crop "
              f"sampling, schedule): {', '.join(recipe_names())}. Classification: baseline, deit, "
              "augreg-<none|light1|light2|medium1|medium2|strong1|strong2>-<none|reg>.")
@click.option("--deep-supervision", is_flag=True,
              help="Also train 1x1 heads on the decoder's coarser levels, loss weights 1, 1/2, 1/4, ... "
              "normalised (nnU-Net); UNETR, Swin-UNETR and U-Net models. Segmentation uses the main head only.")
@click.option("--teacher", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Checkpoint of a trained model (any registered one, e.g. unet_nnunet_3d) with this run's labels, "
              "preprocessing and input: adds DeiT's hard-label distillation to the loss.")
@click.option("--distill-weight", default=0.5, show_default=True,
              help="With --teacher: loss = (1-W) DiceCE(labels) + W CE(argmax of the teacher's logits).")
@click.option("--init-encoder", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Start the encoder (a segmenter's, or a classifier's backbone; its head stays random) from a "
              "`medvit pretrain` checkpoint of the same model and size; refused when a key or shape differs.")
@click.option("--batch-size", type=int, default=None, help="[default: 2; classification: 32]")
@click.option("--samples-per-volume", default=2, show_default=True, help="Random crops per volume and pass.")
@click.option("--lr", type=float, default=None,
              help="[default: 1e-4; classification: the recipe's, 5e-4 x global batch / 512 for deit]")
@click.option("--weight-decay", type=float, default=None,
              help="Decoupled weight decay [default: 1e-5; classification: the recipe's, 0.05 for deit].")
@click.option("--val-fraction", type=float, default=None,
              help="Validate on this random fraction of the cases [default: 0.2; not with --fold].")
@click.option("--folds", type=int, default=None,
              help="Cross-validation as nnU-Net: the sorted cases, permuted by --seed, cut into this many "
              "folds [default with --fold: 5]. Every fold's run draws the same split.")
@click.option("--fold", default=None, metavar="K|all",
              help="Train on all folds but K (0..folds-1) and validate on fold K; 'all': train on every case "
              "and, as nnU-Net's fold 'all', validate on the training cases.")
@click.option("--split-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Take the folds from this file (nnU-Net's splits_final.json, or a run's splits.json) "
              "instead of drawing them; with --fold.")
@click.option("--val-every", type=int, default=None,
              help="Validate every N epochs [default: every epoch; segmentation: every epoch, or as many "
              "epochs as make 250 steps when epochs are shorter (a few cases), and at the end].")
@click.option("--workers", type=int, default=None,
              help="Segmentation: processes that read crops and augment them while the model trains "
              "[default: on a GPU all cores but one, at most 8; on a CPU one per four cores, at least one "
              "from two].")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Segmentation: where cases are kept preprocessed, filled once and reused by later runs "
              "[default: $MEDVIT_CACHE_DIR, else ~/.cache/medvit/cases]; safe to delete.")
@device_option()
@click.option("--amp/--no-amp", default=None,
              help="Mixed precision: fp16 with loss scaling on CUDA; segmentation also bf16 on CPUs with native "
              "bf16 (AVX512-BF16, AMX) [default: segmentation on where the device has it; classification off].")
@click.option("--input-size", default=None, metavar="HxW|DxHxW",
              help="Classification: input size [default: 224x224 images and clips, 64x64x64 volumes].")
@click.option("--kind", type=click.Choice(["image", "volume", "video"]), default=None,
              help="Classification: what an item is, when the files do not say (a 3D .npy).")
@click.option("--frames", default=8, show_default=True, help="Classification of clips: frames sampled per clip.")
@click.option("--in-chans", type=int, default=None,
              help="Classification: model input channels [default: 3 for images and clips, 1 for volumes].")
@click.option("--optimizer", type=click.Choice(["adamw", "sgd", "adafactor", "adafactor_vit"]), default=None,
              help="Classification: the optimiser [default: the recipe's]; adafactor_vit: Scaling ViT's.")
@click.option("--sam", type=click.Choice(["sam", "asam"]), default=None,
              help="Classification: sharpness-aware minimisation around the optimiser (ASAM: adaptive).")
@click.option("--sam-rho", type=float, default=None, help="SAM's neighbourhood radius [default: 0.05].")
@click.option("--ema/--no-ema", default=None, help="Classification: keep (and save) an EMA of the weights.")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from its last checkpoint (end of an epoch).")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def train(data, out_dir, model, model_args, epochs, max_steps, patch_size, slice_axis, slab, spacing, intensity, recipe,
          deep_supervision, teacher, distill_weight, init_encoder, batch_size, samples_per_volume, lr, weight_decay, val_fraction,
          folds, fold, split_file, val_every, workers, cache_dir, device, amp, input_size, kind, frames, in_chans, optimizer, sam, sam_rho,
          ema, resume, seed, quiet) -> None:
    """Train on DATA: a dataset.json (MSD or nnU-Net v2) or a `medvit preprocess` folder
    (segmentation), or a folder per class / a CSV of path,label (classification).

    DATA is verified first (every file readable, labels on their images' grids and
    holding declared values, one channel, finite, no duplicates); a dataset with
    problems is refused with all of them listed, before training starts.

    The run's split of the cases (one fold per entry, nnU-Net's splits_final.json format)
    is written to OUTPUT/splits.json; the checkpoints' cards record the fold and the
    validation cases, and --resume refuses a different split.
    """
    options = click.get_current_context().params
    if is_classification_data(data):
        _refuse_given(SEGMENTATION_ONLY, "segmentation datasets")
        return train_classifier(options)
    _refuse_given(CLASSIFICATION_ONLY, "classification data (a folder per class or a CSV)")
    from medvit.pipelines.slicing import parse_axis
    from medvit.pipelines.train import TrainConfig, train as run

    model, recipe = model or "unetr_base", recipe or "default"
    batch_size, lr = batch_size or 2, 1e-4 if lr is None else lr
    weight_decay = 1e-5 if weight_decay is None else weight_decay

    cfg = TrainConfig(
        data=data, out_dir=out_dir, model=model, model_args=model_args, epochs=epochs, max_steps=max_steps,
        patch_size=tuple(patch_size), slice_axis=parse_axis(slice_axis), slab=slab, spacing=tuple(spacing), intensity=intensity, batch_size=batch_size,
        samples_per_volume=samples_per_volume, lr=lr, weight_decay=weight_decay, val_fraction=val_fraction, folds=folds, fold=fold,
        split_file=split_file, val_every=val_every, workers=workers, cache_dir=cache_dir,
        device=device, amp=amp, resume=resume, seed=seed, progress=not quiet, recipe=recipe,
        deep_supervision=deep_supervision, teacher=teacher, distill_weight=distill_weight, init_encoder=init_encoder,
    )
    with terminate_unwinds():
        result = run(cfg)
    dice = ", ".join(f"{k} {v:.3f}" for k, v in result.last_dice.items())
    click.echo(f"trained {result.steps} steps ({result.epochs} epochs); validation Dice: {dice}")
    click.echo(f"best mean Dice {result.best_dice:.3f}; checkpoints in {result.out_dir}")


SEGMENTATION_ONLY = (
    "patch_size", "slice_axis", "slab", "spacing", "intensity", "deep_supervision", "samples_per_volume", "workers",
    "cache_dir",
)
CLASSIFICATION_ONLY = ("input_size", "kind", "frames", "in_chans", "optimizer", "sam", "sam_rho", "ema")


def _refuse_given(names: tuple[str, ...], applies_to: str) -> None:
    """A usage error for options given on the command line that do not apply to this data."""
    ctx = click.get_current_context()
    given = [n for n in names if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise click.UsageError(f"{flags} only apply to {applies_to}")


def is_classification_data(data: Path) -> bool:
    """A CSV, or a folder of class folders (not a dataset.json layout or a preprocessed folder)."""
    if data.suffix.lower() == ".csv":
        return True
    if not data.is_dir() or (data / "dataset.json").exists() or any(data.glob("*.json")):
        return False
    entries = [p for p in data.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(p.is_dir() for p in entries)


def _size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        size = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        size = ()
    if len(size) not in (2, 3) or min(size) < 1:
        raise click.BadParameter(f"{text!r} is not HxW or DxHxW", param_hint="--input-size")
    return size


def train_classifier(o: dict) -> None:
    from medvit.pipelines.classify_train import ClassifyConfig, train_classifier as run

    cfg = ClassifyConfig(
        data=o["data"], out_dir=o["out_dir"], model=o["model"] or "deit_tiny_patch16_224", model_args=o["model_args"],
        recipe=o["recipe"] or "deit", kind=o["kind"], size=_size(o["input_size"]), frames=o["frames"],
        in_chans=o["in_chans"], epochs=o["epochs"], max_steps=o["max_steps"], batch_size=o["batch_size"] or 32,
        lr=o["lr"], weight_decay=o["weight_decay"], optimizer=o["optimizer"], sam=o["sam"], sam_rho=o["sam_rho"],
        ema=o["ema"], teacher=o["teacher"], distill_weight=o["distill_weight"], init_encoder=o["init_encoder"],
        val_fraction=o["val_fraction"],
        folds=o["folds"], fold=o["fold"], split_file=o["split_file"], val_every=o["val_every"] or 1, device=o["device"],
        amp=bool(o["amp"]), resume=o["resume"], seed=o["seed"], progress=not o["quiet"],
    )
    with terminate_unwinds():
        result = run(cfg)
    m = result.last_metrics
    if not m:  # a rank other than 0 under torchrun: validation runs on rank 0
        return
    auroc = "n/a" if m.get("auroc_macro") is None else f"{m['auroc_macro']:.3f}"
    click.echo(f"trained {result.steps} steps ({result.epochs} epochs); validation accuracy {m['accuracy']:.3f}, "
               f"balanced accuracy {m['balanced_accuracy']:.3f}, AUROC {auroc}")
    click.echo(f"best balanced accuracy {result.best:.3f}; checkpoints in {result.out_dir}")
