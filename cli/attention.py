"""`medvit attention`: attention maps, rollout and mean attention distance of a checkpoint's model."""

from __future__ import annotations

from pathlib import Path

import click
from medvit.cli._common import device_option, terminate_unwinds, user_errors


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--model", "-m", "checkpoint", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A segmentation or classification checkpoint (safetensors).")
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder of the PNGs and attention_distance.csv.")
@click.option("--layer", "layers", type=int, multiple=True,
              help="Attention layer to draw (0-based, call order; repeat). Default: every layer over the input.")
@click.option("--rollout", is_flag=True, help="Also draw the attention rollout (Abnar & Zuidema, 2020).")
@click.option("--at", "at", default=None, metavar="I,J,K",
              help="Scan voxel to centre the window on (segmentation). Default: the scan's centre.")
@device_option()
@user_errors
def attention(input_path, checkpoint, out_dir, layers, rollout, at, device) -> None:
    """Show where the model's attention goes on INPUT: a scan (segmentation checkpoint: one
    window, read as medvit segment does) or an image, volume or clip (classification)."""
    from medvit.pipelines.attention import explain, parse_at

    with terminate_unwinds():
        res = explain(checkpoint, input_path, out_dir, layers=layers or None, rollout=rollout,
                      at=parse_at(at), device=device)
    located = len({r["layer"] for r in res.distances})
    click.echo(f"{len(res.records)} attention layer(s); {len(res.overlays)} map(s)"
               f"{' and the rollout' if res.rollout else ''} and distances of {located} layer(s) in {res.out_dir}")
