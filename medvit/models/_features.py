"""Shared helpers for the common backbone interface (`forward_intermediates`)."""

from __future__ import annotations

from collections.abc import Sequence

OUTPUT_FORMATS = ("NCHW", "NLC")


def feature_take_indices(num_blocks: int, indices: int | Sequence[int] | None) -> list[int]:
    """Block indices to return: None = all, an int n = the last n, a sequence = those.

    Negative indices count from the end, as in Python.

    Raises:
        ValueError: An index is out of range.
    """
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"cannot take the last {indices} of {num_blocks} blocks")
        return list(range(num_blocks - indices, num_blocks))
    out = []
    for i in indices:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < num_blocks:
            raise ValueError(f"block index {i} is out of range for {num_blocks} blocks")
        out.append(j)
    return out


def check_output_fmt(output_fmt: str) -> str:
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
    return output_fmt
