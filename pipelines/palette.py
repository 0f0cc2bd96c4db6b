"""Label colours of every overlay: preview PNGs (`preview`) and TensorBoard images (`train_images`)."""

from __future__ import annotations

__all__ = ["LABEL_COLOURS", "label_colour"]

# A distinct colour per label id (cycled), background transparent. Every colour has two
# channels at least 10 apart, so an overlaid pixel is never grey.
LABEL_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip


def label_colour(label: int) -> tuple[int, int, int]:
    """The RGB colour of a label id (label 1 has the first colour; the list repeats)."""
    return LABEL_COLOURS[(int(label) - 1) % len(LABEL_COLOURS)]
