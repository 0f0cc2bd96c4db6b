"""Feed-forward with a depthwise convolution between its linears.

The convolutional feed-forward of PVT v2 (Wang et al., 2022) and the Mix-FFN of
SegFormer (Xie et al., 2021): the 3x3 depthwise convolution on the hidden map leaks
enough position information that the models need no position embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import check_spatial_dims, conv_nd
from medvit.layers.token_map import map_to_tokens, tokens_to_map


class DWConvMlp(nn.Module):
    """Linear -> (ReLU) -> depthwise 3x3 conv -> act -> dropout -> linear -> dropout.

    Drops in as `Block(mlp_layer=partial(DWConvMlp, spatial_dims, ...))`. The depthwise conv needs the
    token grid: `forward` takes it from its caller, so one set of weights runs at any input
    size, or falls back to a `grid_size` fixed at construction.

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_features: Token width (also the output width).
        hidden_features: Hidden width (defaults to `in_features`).
        act_layer: Activation after the depthwise conv.
        drop: Dropout after the activation and after the output projection.
        grid_size: Default grid of the tokens, used when `forward` is given none; None:
            every call passes its grid.
        extra_relu: ReLU before the depthwise conv (PVT v2's linear-SRA variant).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_features: int,
        hidden_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        grid_size: Sequence[int] | None = None,
        extra_relu: bool = False,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if grid_size is not None and len(grid_size) != spatial_dims:
            raise ValueError(f"grid_size {tuple(grid_size)} does not have {spatial_dims} dims")
        hidden = hidden_features or in_features
        self.spatial_dims = spatial_dims
        self.grid_size = None if grid_size is None else tuple(grid_size)
        self.fc1 = nn.Linear(in_features, hidden)
        self.relu: nn.Module = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = conv_nd(spatial_dims)(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
        """Feed-forward over `(B, N, C)` tokens that lie on `grid`.

        Args:
            x: Tokens (no prefix tokens).
            grid: Grid of the tokens; None: the `grid_size` given at construction.

        Raises:
            ValueError: No grid is known, or it does not fit the tokens.
        """
        if grid is None:
            if self.grid_size is None:
                raise ValueError("DWConvMlp built without grid_size needs the token grid")
            grid = self.grid_size
        elif len(grid) != self.spatial_dims:
            raise ValueError(f"grid {tuple(grid)} does not have {self.spatial_dims} dims")
        _, y = tokens_to_map(self.fc1(x), grid)
        y = map_to_tokens(self.dwconv(self.relu(y)))
        return self.drop(self.fc2(self.drop(self.act(y))))
