"""Shared helpers for the common backbone interface (`forward_intermediates`).

Every backbone's `forward_intermediates` takes the same arguments; a model's own
docstring only describes what differs (input and output shapes, which blocks count):

    forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW",
                          intermediates_only=False, stop_early=False[, return_prefix_tokens=False])

- `indices`: blocks to return: None = all, n = the last n, or a list (0-based,
  negative counts from the end).
- `norm`: apply the final norm to each intermediate.
- `output_fmt`: `NCHW` (channels-first map `(B, D, *grid)`, in any number of dims) or
  `NLC` (patch tokens `(B, N, D)`); prefix (class, distillation) tokens are removed.
- `intermediates_only`: return only the list.
- `stop_early`: stop after the last requested block (only with `intermediates_only`).
- `return_prefix_tokens` (token models with prefix tokens): return `(map, prefix)` pairs.

It returns the intermediates, or `(final, intermediates)` where `final` is what
`forward_features` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn as nn

from medvit.layers.pooling import pool_tokens
from medvit.layers.token_map import tokens_to_map

OUTPUT_FORMATS = ("NCHW", "NLC")

State = TypeVar("State")


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


def feature_take_last(
    num_blocks: int,
    indices: int | Sequence[int] | None,
    output_fmt: str,
    stop_early: bool,
    intermediates_only: bool,
) -> tuple[list[int], int]:
    """Check the arguments of `forward_intermediates`; the blocks to take and the last to run.

    Args:
        num_blocks: Length of the block stack.
        indices: As `feature_take_indices`.
        output_fmt: Checked against `OUTPUT_FORMATS`.
        stop_early: Run only up to the last taken block; honoured only with
            `intermediates_only`, since otherwise the final tokens are returned too.
        intermediates_only: Whether only the intermediates are returned.

    Returns:
        `(take, last)`: the 0-based blocks to return and the index of the last block to run.

    Raises:
        ValueError: Bad `output_fmt` or an index out of range.
    """
    check_output_fmt(output_fmt)
    take = feature_take_indices(num_blocks, indices)
    # with nothing to take there is no block to stop at; run them all
    last = max(take) if (stop_early and intermediates_only and take) else num_blocks - 1
    return take, last


class TokenPoolHead:
    """`forward_head` of a token model: `pool_tokens`, head dropout, then the classifier.

    A mixin for an `nn.Module` that sets `global_pool`, `num_prefix_tokens`, `head_drop`
    and `head`.
    """

    global_pool: str
    num_prefix_tokens: int
    head_drop: nn.Module
    head: nn.Module

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the tokens and classify (or return the pooled vector with `pre_logits`)."""
        x = self.head_drop(pool_tokens(x, self.global_pool, self.num_prefix_tokens))
        return x if pre_logits else self.head(x)


def format_intermediate(
    x: torch.Tensor,
    grid: Sequence[int],
    output_fmt: str,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_prefix_tokens: int = 0,
    return_prefix_tokens: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One block's `(B, prefix + N, D)` tokens as the intermediate `forward_intermediates` returns.

    Args:
        x: Block output.
        grid: Token grid of the patch tokens (row-major).
        output_fmt: `NCHW` (`(B, D, *grid)` map) or `NLC` (`(B, N, D)` tokens).
        norm: Applied to all tokens first, when given (the model's final norm).
        num_prefix_tokens: Leading class/distillation/register tokens, removed.
        return_prefix_tokens: Return `(patch_part, prefix_tokens)`.

    Returns:
        The patch part, or `(patch_part, prefix_tokens)`.
    """
    if norm is not None:
        x = norm(x)
    if output_fmt == "NCHW":
        prefix, y = tokens_to_map(x, grid, num_prefix_tokens)
    else:
        prefix, y = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]
    return (y, prefix) if return_prefix_tokens else y


def collect_intermediates(
    blocks: Sequence[Any],
    x: State,
    take: Sequence[int],
    last: int,
    extract: Callable[[State], Any],
    step: Callable[[Any, State], State] | None = None,
) -> tuple[State, list]:
    """Run `blocks[0..last]` on `x`, extracting an intermediate after each block in `take`.

    Args:
        blocks: The block stack (`nn.Sequential` or `nn.ModuleList`).
        x: Input state of the first block (a tensor, or whatever `step` passes on).
        take: Blocks whose output is extracted, as from `feature_take_last`.
        last: Index of the last block to run.
        extract: Block output -> intermediate.
        step: `(block, state) -> state`; default calls the block on the state.

    Returns:
        `(state after block last, intermediates in block order)`.
    """
    feats = []
    for i, blk in enumerate(blocks[: last + 1]):
        x = step(blk, x) if step is not None else blk(x)
        if i in take:
            feats.append(extract(x))
    return x, feats


def check_stride_multiple(size: Sequence[int], stride: int, what: str) -> None:
    """Refuse a spatial `size` that is not a positive multiple of a segmenter's total `stride`.

    Raises:
        ValueError: Naming `what` (``img_size``, ``input size``), the size and the stride.
    """
    if any(s % stride or s < stride for s in size):
        raise ValueError(f"{what} {tuple(size)} must be a positive multiple of {stride} in every dimension")
