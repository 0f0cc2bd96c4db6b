"""`medvit train`: train a segmentation model on a dataset."""

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
@click.option("--model", "-m", default="unetr_base", show_default=True, help="Registered model name.")
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
@click.option("--recipe", default="default", show_default=True,
              help=f"Training recipe (augmentation, crop sampling, schedule): {', '.join(recipe_names())}.")
@click.option("--deep-supervision", is_flag=True,
              help="Also train 1x1 heads on the decoder's coarser levels, loss weights 1, 1/2, 1/4, ... "
              "normalised (nnU-Net); UNETR, Swin-UNETR and U-Net models. Segmentation uses the main head only.")
@click.option("--teacher", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Checkpoint of a trained model (any registered one, e.g. unet_nnunet_3d) with this run's labels, "
              "preprocessing and input: adds DeiT's hard-label distillation to the loss.")
@click.option("--distill-weight", default=0.5, show_default=True,
              help="With --teacher: loss = (1-W) DiceCE(labels) + W CE(argmax of the teacher's logits).")
@click.option("--batch-size", default=2, show_default=True)
@click.option("--samples-per-volume", default=2, show_default=True, help="Random crops per volume and pass.")
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--weight-decay", default=1e-5, show_default=True, help="AdamW's decoupled weight decay.")
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
@click.option("--val-every", default=1, show_default=True, help="Validate every N epochs.")
@device_option()
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only; ignored on CPU).")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from its last checkpoint (end of an epoch).")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def train(data, out_dir, model, model_args, epochs, max_steps, patch_size, slice_axis, slab, spacing, intensity, recipe,
          deep_supervision, teacher, distill_weight, batch_size, samples_per_volume, lr, weight_decay, val_fraction, folds, fold, split_file, val_every, device, amp, resume, seed, quiet) -> None:
    """Train on DATA: a dataset.json (MSD or nnU-Net v2) or a `medvit preprocess` folder.

    DATA is verified first (every file readable, labels on their images' grids and
    holding declared values, one channel, finite, no duplicates); a dataset with
    problems is refused with all of them listed, before training starts.

    The run's split of the cases (one fold per entry, nnU-Net's splits_final.json format)
    is written to OUTPUT/splits.json; the checkpoints' cards record the fold and the
    validation cases, and --resume refuses a different split.
    """
    from medvit.pipelines.slicing import parse_axis
    from medvit.pipelines.train import TrainConfig, train as run

    cfg = TrainConfig(
        data=data, out_dir=out_dir, model=model, model_args=model_args, epochs=epochs, max_steps=max_steps,
        patch_size=tuple(patch_size), slice_axis=parse_axis(slice_axis), slab=slab, spacing=tuple(spacing), intensity=intensity, batch_size=batch_size,
        samples_per_volume=samples_per_volume, lr=lr, weight_decay=weight_decay, val_fraction=val_fraction, folds=folds, fold=fold,
        split_file=split_file, val_every=val_every,
        device=device, amp=amp, resume=resume, seed=seed, progress=not quiet, recipe=recipe,
        deep_supervision=deep_supervision, teacher=teacher, distill_weight=distill_weight,
    )
    with terminate_unwinds():
        result = run(cfg)
    dice = ", ".join(f"{k} {v:.3f}" for k, v in result.last_dice.items())
    click.echo(f"trained {result.steps} steps ({result.epochs} epochs); validation Dice: {dice}")
    click.echo(f"best mean Dice {result.best_dice:.3f}; checkpoints in {result.out_dir}")
