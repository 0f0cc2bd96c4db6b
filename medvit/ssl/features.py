"""A pooled vector and the deepest feature map of any registered encoder.

Backbones share one interface (`medvit.models._features`): `forward_intermediates(x,
indices=1, norm=True, output_fmt="NCHW")` gives the final features (what `forward_features`
returns) and the last block's or stage's output as a channels-first map `(B, C, *grid)`, for
single-scale ViTs (prefix tokens dropped) and hierarchical encoders (Swin, PVT v2, MiT)
alike, in 2D and 3D. The pooled vector is the backbone's own `forward_head(pre_logits=True)`
when it pools (`global_pool` set: class token, average, attention), else the mean of the map
(the segmenters' encoders, built with `global_pool=""`).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class EncoderFeatures(nn.Module):
    """Wrap an encoder: `forward(x) -> (pooled (B, D), map (B, C, *grid))`.

    Args:
        encoder: A registered backbone (or a segmenter's `encoder`).

    Attributes:
        encoder: The wrapped encoder (its state dict is what pretraining saves).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not hasattr(encoder, "forward_intermediates"):
            raise TypeError(f"{type(encoder).__name__} has no forward_intermediates; not a medvit backbone")
        self.encoder = encoder

    def pools(self) -> bool:
        """Whether the backbone's own head pools its tokens (`global_pool` non-empty)."""
        return bool(getattr(self.encoder, "global_pool", "")) and hasattr(self.encoder, "forward_head")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        final, feats = self.encoder.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW")
        fmap = feats[-1]
        if isinstance(fmap, tuple):  # (map, prefix tokens)
            fmap = fmap[0]
        if self.pools():
            pooled = self.encoder.forward_head(final, pre_logits=True)
        else:
            pooled = fmap.flatten(2).mean(-1)
        return pooled, fmap

    @torch.no_grad()
    def dims(self, sample: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
        """(pooled width, map channels, map grid) for inputs shaped like `sample` (one forward)."""
        was = self.training
        self.eval()
        try:
            pooled, fmap = self(sample)
        finally:
            self.train(was)
        return int(pooled.shape[-1]), int(fmap.shape[1]), tuple(fmap.shape[2:])
