"""`medvit export`: a checkpoint as ONNX or TorchScript, checked against torch."""

from __future__ import annotations

from pathlib import Path

import click

from medvit.cli._common import terminate_unwinds, user_errors


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--output", "-o", "out", required=True, type=click.Path(path_type=Path),
              help="The file to write: .onnx for ONNX, .pt for TorchScript.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default=None,
              help="Export format [default: from the output's suffix].")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: the exporter's].")
@click.option("--tolerance", type=float, default=1e-3, show_default=True,
              help="Largest logit difference from torch allowed (times the largest logit when above 1).")
@user_errors
def export(checkpoint, out, fmt, opset, tolerance) -> None:
    """Export CHECKPOINT for a window of its patch size, with a dynamic batch axis.

    The model card travels in the file (`medvit segment -m model.onnx` reads it). The
    export is kept only if it gives torch's logits on a random window.
    """
    from medvit.pipelines.export_model import export_model

    with terminate_unwinds():
        result = export_model(checkpoint, out, fmt, opset, tolerance)
    click.echo(result.summary())
