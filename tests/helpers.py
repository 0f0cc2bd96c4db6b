"""Helpers shared by tests (importable: `tests/` is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_UNETR_ARGS = dict(
    img_size=(32, 32, 32),
    num_classes=5,
    in_chans=1,
    feature_size=4,
    skip_indices=[0, 1, 2],
    encoder_args=dict(embed_dim=32, depth=3, num_heads=2),
)
PHANTOM_LABELS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}


def make_tiny_checkpoint(path: Path, spacing=(3.0, 3.0, 4.0), seed: int = 0) -> Path:
    """A random-weight tiny UNETR checkpoint with the phantom's labels."""
    import medvit
    from medvit.pipelines.checkpoint import ModelCard, save_checkpoint

    torch.manual_seed(seed)
    model = medvit.create_model("unetr_tiny", **TINY_UNETR_ARGS)
    card = ModelCard(
        model_name="unetr_tiny",
        model_args=TINY_UNETR_ARGS,
        labels={i: {"id": i, "name": n} for i, n in PHANTOM_LABELS.items()},
        preprocessing={"spacing": list(spacing), "intensity": "ct"},
        patch_size=(32, 32, 32),
    )
    return save_checkpoint(model, card, path)
