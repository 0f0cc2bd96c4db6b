"""`medvit pretrain`: self-supervised pretraining of an encoder on unlabelled scans."""

from __future__ import annotations

from pathlib import Path

import click

from medvit.cli._common import _parse_model_args, device_option, model_arg_option, terminate_unwinds, user_errors
from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW, DEFAULT_SPACING


@click.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Run folder: last/best.safetensors (the encoder), last_state.pt, config.json, tb/.")
@click.option("--method", type=click.Choice(["moco", "dino", "sit"]), default="dino", show_default=True,
              help="MoCo v3, DINO (2 global + --local-crops local views) or SiT (rotation, masked-patch "
              "reconstruction, contrast).")
@click.option("--model", "-m", default="unetr_base", show_default=True,
              help="A registered backbone, or a segmenter (unetr_*, swin_unetr_*) whose encoder is pretrained "
              "as the segmenter builds it, for `medvit train --init-encoder`.")
@model_arg_option()
@click.option("--method-arg", "method_args", multiple=True, callback=_parse_model_args,
              help="Method option KEY=VALUE (VALUE as JSON), repeatable: moco dim, mlp_dim, T, momentum, "
              "freeze_patch_embed; dino out_dim, hidden_dim, bottleneck_dim, student_temp, teacher_temp, "
              "center_momentum, momentum, norm_last_layer; sit weights ([rotation, reconstruction, contrast]), "
              "corrupt_ratio, dim, mlp_dim, T.")
@click.option("--spatial-dims", type=click.Choice(["2", "3"]), default="3", show_default=True,
              help="3: 3D views of the volumes; 2: views of their axial slices (2D encoders).")
@click.option("--crop", nargs=3, type=int, default=(96, 96, 96), show_default=True,
              help="Global view size in voxels (x y z; 2D: x y, the third ignored). It is the encoder's "
              "img_size: fine-tune at the same --patch-size.")
@click.option("--local-crops", default=4, show_default=True, help="DINO: local views per sample (half the crop).")
@click.option("--spacing", nargs=3, type=float, default=DEFAULT_SPACING, show_default=True,
              help="Voxel size in mm the scans are resampled to.")
@click.option("--ct-window", nargs=2, type=float, default=DEFAULT_CT_WINDOW, show_default=True,
              help="HU window scaled to 0..1.")
@click.option("--epochs", type=int, default=None, help="Passes over the data [default: 100, or as --max-steps takes].")
@click.option("--max-steps", type=int, default=None, help="Optimiser steps (with --epochs: whichever ends first).")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--samples-per-volume", default=8, show_default=True, help="Samples per scan and epoch.")
@click.option("--lr", type=float, default=None,
              help="[default: the paper's base LR x global batch / 256: moco 1.5e-4, dino 5e-4, sit 5e-4]")
@click.option("--weight-decay", type=float, default=None, help="[default: moco 0.1, dino 0.04, sit 0.05]")
@click.option("--workers", default=0, show_default=True, help="Data loader worker processes.")
@device_option()
@click.option("--amp", is_flag=True, help="Mixed precision (CUDA only).")
@click.option("--resume", is_flag=True, help="Continue the run in OUTPUT from its last state.")
@click.option("--seed", default=0, show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def pretrain(data, out_dir, method, model, model_args, method_args, spatial_dims, crop, local_crops, spacing,
             ct_window, epochs, max_steps, batch_size, samples_per_volume, lr, weight_decay, workers, device, amp,
             resume, seed, quiet) -> None:  # fmt: skip
    """Pretrain an encoder on the unlabelled scans DATA (files, DICOM series folders, folders
    of those): resampled to --spacing, CT-windowed, random views of random regions. With
    --spatial-dims 2 the views come from axial slices, or from DATA's 2D images (PNG, JPEG,
    BMP, TIFF files or folders of them).

    The checkpoints hold the encoder (DINO's teacher) with a card of task `pretraining`;
    load it with `medvit train ... --model SAME --init-encoder OUTPUT/last.safetensors`.
    """
    from medvit.pipelines.pretrain import PretrainConfig, pretrain as run

    dims = int(spatial_dims)
    cfg = PretrainConfig(
        data=list(data), out_dir=out_dir, method=method, model=model, model_args=model_args, method_args=method_args,
        spatial_dims=dims, crop=tuple(crop[:dims]), local_crops=local_crops, spacing=tuple(spacing),
        ct_window=tuple(ct_window), epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        samples_per_volume=samples_per_volume, lr=lr, weight_decay=weight_decay, workers=workers, device=device,
        amp=amp, resume=resume, seed=seed, progress=not quiet,
    )  # fmt: skip
    with terminate_unwinds():
        result = run(cfg)
    if not result.main:  # another process under torchrun: rank 0 reports
        return
    click.echo(f"pretrained {result.steps} steps ({result.epochs} epochs) with {method}; last epoch loss "
               f"{result.last_loss:.4f}, best {result.best_loss:.4f}; encoder in {result.out_dir / 'last.safetensors'}")
