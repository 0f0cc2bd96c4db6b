"""`medvit predict`: class probabilities of images, volumes or clips from a classifier checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from medvit.cli._common import device_option, terminate_unwinds, user_errors


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "-m", "checkpoint", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="A classification checkpoint made by medvit train.")
@click.option("--output", "-o", "out_csv", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="CSV: id, path, predicted, p_<class>... (one row per input).")
@click.option("--batch-size", default=16, show_default=True)
@device_option()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@user_errors
def predict(inputs, checkpoint, out_csv, batch_size, device, quiet) -> None:
    """Classify INPUTS: files, DICOM series or clip folders, CSVs with a path column, or
    folders of class folders; read as in training (the checkpoint's kind, size, channels)."""
    from medvit.pipelines.classify_predict import predict as run

    with terminate_unwinds():
        out, items, probs = run(checkpoint, inputs, out_csv, device=device, batch_size=batch_size, progress=not quiet)
    counts = probs.argmax(1)
    click.echo(f"{len(items)} input(s) classified; {out} written ({probs.shape[1]} classes, "
               f"{len(set(counts.tolist()))} predicted)")
