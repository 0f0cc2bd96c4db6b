"""Entry point of the `medvit` command.

Sub-commands live one per module and are imported only when invoked, so `medvit --help`
answers without loading torch.
"""

from __future__ import annotations

import importlib

import click

import medvit

# command name -> "module:function" inside medvit.cli
COMMANDS = {
    "segment": "segment:segment",
    "train": "train:train",
    "pretrain": "pretrain:pretrain",
    "preprocess": "preprocess:preprocess",
    "evaluate": "evaluate:evaluate",
    "convert": "convert:convert",
    "export": "export:export",
    "predict": "predict:predict",
    "models": "info:models",
    "info": "info:info",
    "attention": "attention:attention",
}

_HELP = {
    "segment": "Segment scans with a trained checkpoint; masks on each scan's own grid.",
    "train": "Train a segmentation model (dataset.json, preprocessed folder) or a classifier (class folders, CSV).",
    "pretrain": "Self-supervised pretraining (MoCo v3, DINO, SiT) of an encoder on unlabelled scans.",
    "predict": "Class probabilities of images, volumes or clips from a classifier checkpoint (CSV).",
    "preprocess": "Cache resampled, normalised volumes and write a dataset fingerprint.",
    "evaluate": "Per-label Dice and HD95 of masks against references, or a folder of --statistics as one CSV.",
    "convert": "Turn MONAI or timm weights into a medvit checkpoint.",
    "export": "Export a checkpoint to ONNX or TorchScript, checked against torch.",
    "models": "List registered models and their kinds (--params: parameter counts).",
    "info": "Shape, spacing, orientation and intensity range of a scan.",
    "attention": "Attention maps, rollout and mean attention distance of a checkpoint's model on one input.",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n in COMMANDS if self._available(n))

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(f"medvit.cli.{module}") is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"medvit.cli.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, _HELP[n]) for n in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(medvit.__version__, prog_name="medvit")
def main() -> None:
    """medvit: 3D medical image segmentation with Vision Transformers."""
