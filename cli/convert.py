"""`medvit convert`: MONAI / timm weights -> a medvit checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from medvit.cli._common import model_arg_option, user_errors
from medvit.pipelines.preprocessing import DEFAULT_CT_WINDOW, DEFAULT_SPACING


@click.command()
@click.argument("weights", type=click.Path(path_type=Path))
@click.option("--output", "-o", "out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="The medvit checkpoint to write (.safetensors).")
@click.option("--from", "source", type=click.Choice(["monai", "timm"]), required=True)
@click.option("--model", "-m", required=True, help="medvit model name with the same architecture.")
@model_arg_option()
@click.option("--num-classes", type=int, default=None, help="Output classes, background included.")
@click.option("--in-chans", type=int, default=None)
@click.option("--img-size", nargs=3, type=int, default=None, help="Model input / sliding-window size.")
@click.option("--spacing", nargs=3, type=float, default=DEFAULT_SPACING, show_default=True,
              help="Target spacing (mm) the weights were trained at.")
@click.option("--intensity", type=click.Choice(["ct", "mr", "none"]), default="ct", show_default=True)
@click.option("--ct-window", nargs=2, type=float, default=DEFAULT_CT_WINDOW, show_default=True)
@click.option("--labels", multiple=True, help="Names of classes 1..N-1, in order (repeatable).")
@user_errors
def convert(weights, out, source, model, model_args, num_classes, in_chans, img_size, spacing, intensity, ct_window, labels) -> None:
    """Convert WEIGHTS (a MONAI or timm state dict: .pt/.pth/.bin or .safetensors)."""
    from medvit.pipelines.convert_weights import ConvertConfig, convert as run

    cfg = ConvertConfig(source=source, model=model, model_args=model_args, num_classes=num_classes, in_chans=in_chans,
                        img_size=img_size or None, spacing=spacing, intensity=intensity,
                        labels=list(labels) or None, ct_window=ct_window)
    path, card = run(weights, out, cfg)
    click.echo(f"wrote {path}: {card.model_name}, {card.num_classes - 1} labels, patch {card.patch_size}")
