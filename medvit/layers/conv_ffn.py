"""Convolutional feed-forward on the token grid: the MLP with a depthwise conv inside.

One block serves two papers that bring locality into the transformer's feed-forward:

- LeFF, the locally-enhanced feed-forward of CeiT (Yuan et al., "Incorporating Convolution
  Designs into Visual Transformers", ICCV 2021): the patch tokens are restored to their
  grid, expanded, filtered by a depthwise kxk convolution, projected back; BN and GELU
  after the expansion and the depthwise conv, BN after the projection.
- The locality feed-forward of LocalViT (Li et al., "LocalViT: Bringing Locality to
  Vision Transformers", 2021): the same inverted residual with bias-free convolutions,
  h-swish or ReLU6, and an optional squeeze-excite after the depthwise conv.

The expansion and projection are 1x1 convolutions, i.e. the linear layers of the MLP
applied to every token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.helpers import batch_norm_nd, conv_nd
from medvit.layers.squeeze_excite import SqueezeExcite
from medvit.layers.token_map import map_to_tokens, tokens_to_map


class ConvFeedForward(nn.Module):
    """1x1 expand -> BN -> act -> depthwise kxk -> BN -> act -> (SE) -> 1x1 project -> BN.

    Drops in as `Block(mlp_layer=partial(ConvFeedForward, spatial_dims, grid_size=...))`. The token grid
    is fixed at construction (the models using it have a fixed input size).

    Args:
        spatial_dims: 2 for images, 3 for volumes.
        in_features: Token width (also the output width).
        hidden_features: Expanded width (defaults to `in_features`).
        act_layer: Activation after the expansion and after the depthwise conv.
        drop: Dropout on the output.
        grid_size: Grid of the patch tokens.
        num_prefix_tokens: Leading tokens (class token) that are not on the grid.
        kernel_size: Odd extent of the depthwise convolution.
        bias: Bias of the three convolutions (CeiT: True, LocalViT: False).
        se_reduction: Squeeze-excite on the expanded map with `hidden // se_reduction`
            channels (LocalViT); None: no squeeze-excite.
        pass_prefix: Return the prefix tokens as they came in (CeiT, whose block then adds
            the normalised class token to itself); when False they come out as zeros, so
            the block's residual leaves them unchanged (LocalViT).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_features: int,
        hidden_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        grid_size: Sequence[int] = (14, 14),
        num_prefix_tokens: int = 1,
        kernel_size: int = 3,
        bias: bool = True,
        se_reduction: int | None = None,
        pass_prefix: bool = True,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the depthwise kernel size must be odd and positive, got {kernel_size}")
        if len(grid_size) != spatial_dims:
            raise ValueError(f"grid_size {tuple(grid_size)} does not have {spatial_dims} dims")
        hidden = hidden_features or in_features
        conv, norm = conv_nd(spatial_dims), batch_norm_nd(spatial_dims)
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.pass_prefix = pass_prefix
        self.conv1 = conv(in_features, hidden, 1, bias=bias)
        self.bn1 = norm(hidden)
        self.conv2 = conv(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=bias)
        self.bn2 = norm(hidden)
        self.act = act_layer()
        self.se: nn.Module = nn.Identity()
        if se_reduction:
            self.se = SqueezeExcite(spatial_dims, hidden, hidden // se_reduction, gate_layer=nn.Hardsigmoid)
        self.conv3 = conv(hidden, in_features, 1, bias=bias)
        self.bn3 = norm(in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix, y = tokens_to_map(x, self.grid_size, self.num_prefix_tokens)
        y = self.act(self.bn1(self.conv1(y)))
        y = self.se(self.act(self.bn2(self.conv2(y))))
        y = self.drop(self.bn3(self.conv3(y)))
        return map_to_tokens(y, prefix if self.pass_prefix else torch.zeros_like(prefix))
