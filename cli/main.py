"""Entry point of the `medvit` command."""

from __future__ import annotations

import click

import medvit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(medvit.__version__, prog_name="medvit")
def main() -> None:
    """medvit: 3D medical image segmentation with Vision Transformers."""
