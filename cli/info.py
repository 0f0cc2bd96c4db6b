"""`medvit models` and `medvit info`: what models exist, and what a scan looks like."""

from __future__ import annotations

from pathlib import Path

import click

from medvit.cli._common import user_errors
from medvit.pipelines.errors import MedvitError

_GLOB_CHARS = "*?["


def _param_count(name: str) -> int | None:
    """Parameters of a registered model, built on the meta device (no memory, no init time)."""
    import torch

    import medvit

    try:
        with torch.device("meta"):
            model = medvit.create_model(name)
    except Exception:
        # A variant whose constructor needs real tensor values cannot be sized this
        # way; the listing still names it.
        return None
    return sum(p.numel() for p in model.parameters())


def format_count(n: int | None) -> str:
    """Parameter count as ``86.6M``, ``1.2B`` or ``512.0K``; ``?`` when unknown."""
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K"


@click.command("models")
@click.argument("pattern", required=False, default="*")
@click.option("--params", "-p", is_flag=True,
              help="Also count each model's parameters (builds them on the meta device: imports their families).")
@user_errors
def models(pattern: str, params: bool) -> None:
    """List registered models matching PATTERN, with their kind (image, video, volume).

    PATTERN is a shell-style pattern (`vit_*_224`); without wildcards it matches
    any name containing it (`unetr`). `image*`, `video*` and `volume*` list a kind.
    No match is an error (exit 1). The plain listing imports no model family.
    """
    from medvit.registry import KINDS, list_models, model_kind

    if pattern.rstrip("*") in KINDS:
        names = list_models(kind=pattern.rstrip("*"))
    else:
        query = pattern if any(c in pattern for c in _GLOB_CHARS) else f"*{pattern}*"
        names = list_models(query)
    total = len(list_models())
    if not names:
        raise MedvitError(f"no registered model matches {pattern!r} ({total} models registered; run `medvit models`)")
    width = max(len(n) for n in names)
    counts = {name: format_count(_param_count(name)) for name in names} if params else {}
    count_width = max((len(c) for c in counts.values()), default=0)
    for name in names:
        row = f"{name.ljust(width)}  {model_kind(name).ljust(6)}"
        click.echo(f"{row}  {counts[name].rjust(count_width)}" if params else row)
    if pattern == "*":
        click.echo(f"{total} models")
    else:
        click.echo(f"{len(names)} of {total} models match {pattern!r}")


def _format_name(path: Path) -> str:
    from medvit.pipelines.io import ITK_FILE_SUFFIXES, NIFTI_SUFFIXES

    lower = path.name.lower()
    if path.is_dir():
        return "DICOM series"
    if lower.endswith(NIFTI_SUFFIXES):
        return "NIfTI"
    suffix = Path(lower).suffix
    if suffix in ITK_FILE_SUFFIXES:
        return ITK_FILE_SUFFIXES[suffix]
    return "DICOM"


@click.command("info")
@click.argument("scan", type=click.Path(path_type=Path))
@user_errors
def info(scan: Path) -> None:
    """Show the geometry and intensity range of SCAN (NIfTI, NRRD, MHA, DICOM file or series folder)."""
    import numpy as np

    from medvit.pipelines.io import read_scan

    image = read_scan(scan)  # ScanError is a MedvitError: one line, exit 1
    array = image.array
    if array.size:
        low, high, mean = array.min(), array.max(), float(array.mean(dtype=np.float64))
        intensity = f"min {low:g}  max {high:g}  mean {mean:.4g}"
    else:
        intensity = "no voxels"
    click.echo(f"path         {image.path}")
    click.echo(f"format       {_format_name(image.path)}")
    click.echo(f"shape        {' x '.join(str(n) for n in image.shape)}")
    click.echo(f"spacing      {' x '.join(str(round(s, 4)) for s in image.spacing)} mm")
    click.echo(f"orientation  {image.orientation()}")
    click.echo(f"dtype        {array.dtype}")
    click.echo(f"intensity    {intensity}")
    click.echo("affine (voxel -> RAS mm)")
    for row in image.affine:
        click.echo("  " + "  ".join(f"{v:10.4f}" for v in row))
