"""Class probabilities of images, volumes or clips from a classification checkpoint.

Inputs are read exactly as in training (`classify_data.ClassificationDataset` without
augmentation: the card's kind, size, channels and intensity rule), and the probabilities
are written as one CSV (`classify_metrics.write_predictions_csv`), atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from medvit.pipelines.checkpoint import load_checkpoint, require_task
from medvit.pipelines.classify_data import (
    ClassificationDataset,
    ClassificationSet,
    Item,
    item_kinds,
    read_classification_data,
)
from medvit.pipelines.classify_metrics import write_predictions_csv
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.runtime import resolve_device


def prediction_items(inputs: Sequence[str | Path], kind: str) -> list[Item]:
    """The items named by `inputs`: CSV files (a `path` column), folders of class folders,
    folders of items, and single items (files, DICOM series folders, clip folders); an
    item's id is its path (its CSV id, or `<class>/<name>` in a class tree)."""
    items: list[Item] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise MedvitError.at(path, "no such file or folder")
        if path.suffix.lower() == ".csv":
            items += read_classification_data(path, kind).items
        elif _is_item(path, kind):
            items.append(Item(path, None, str(path)))
        elif path.is_dir():
            entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            if entries and all(p.is_dir() and not _is_item(p, kind) for p in entries):
                items += read_classification_data(path, kind).items
            else:
                items += [_single(p, kind) for p in entries]
        else:
            raise MedvitError.at(path, f"not a {kind} (the model classifies {kind}s)")
    if not items:
        raise MedvitError("no inputs to classify")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise MedvitError.at(item.path, f"given twice (id {item.id})")
        seen.add(item.id)
    return items


def _is_item(path: Path, kind: str) -> bool:
    try:
        return kind in item_kinds(path)
    except MedvitError:
        return False


def _single(path: Path, kind: str) -> Item:
    if kind not in item_kinds(path):  # raises its own one-line error for an unknown file
        raise MedvitError.at(path, f"not a {kind} (the model classifies {kind}s)")
    return Item(path, None, str(path))


@torch.inference_mode()
def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_csv: str | Path,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[Path, list[Item], np.ndarray]:
    """Classify `inputs` with `checkpoint`; write `out_csv` (id, path, predicted, p_<class>...).

    Returns:
        The CSV written, the items in its order and their probabilities (N, K).

    Raises:
        MedvitError: A segmentation checkpoint, an input that is missing or of another kind.
    """
    dev = resolve_device(device)
    model, card = load_checkpoint(checkpoint, dev)
    require_task(card, checkpoint, "classification")
    prep, classes = card.preprocessing, card.class_names()
    kind = prep["kind"]
    items = prediction_items(inputs, kind)
    frames = prep.get("frames")
    size = tuple(card.patch_size[1:] if kind == "video" else card.patch_size)
    data = ClassificationSet(items, classes, kind)
    ds = ClassificationDataset(data, size, prep["in_chans"], frames, intensity=prep.get("intensity", "auto"))
    model.eval()
    probs = []
    for x, _ in tqdm(DataLoader(ds, batch_size=batch_size), desc="predict", disable=not progress):
        probs.append(torch.softmax(model(x.to(dev)).float(), -1).cpu())
    p = torch.cat(probs).numpy()
    out = write_predictions_csv(out_csv, [i.id for i in items], p, classes, [i.path for i in items])
    return out, items, p
