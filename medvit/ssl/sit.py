"""SiT-style multi-task pretraining: rotation prediction, masked-patch reconstruction, contrast.

Atito, Awais, Kittler, "SiT: Self-supervised vIsion Transformer", 2021. Each view is
rotated by a random multiple of 90 degrees (in the plane of the last two spatial axes:
about the first axis of a volume) and a random fraction of its patches (the encoder's
output stride, so one patch is one cell of the feature map) is corrupted, each corrupted
patch zeroed or replaced by noise. From the corrupted, rotated view the encoder's pooled
vector predicts the rotation (4 classes) and feeds a projector for the contrastive term
between the two views (MoCo v3's `ctr` with the batch as negatives, no momentum encoder),
and a light decoder (two 1x1 convolutions and a pixel shuffle) reconstructs the clean
rotated view from the feature map; the L1 reconstruction loss counts the corrupted
patches only. The three losses are weighted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.helpers import conv_nd
from medvit.ssl.common import build_mlp
from medvit.ssl.features import EncoderFeatures
from medvit.ssl.moco import contrastive_loss

NUM_ROTATIONS = 4


def rotate_batch(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate sample `i` of `x` by `k[i]` * 90 degrees in the plane of its last two axes.

    Raises:
        ValueError: The last two axes differ in size (a rotation would change the shape).
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rotation needs equal sizes along the last two axes, got {tuple(x.shape[2:])}")
    return torch.stack([torch.rot90(xi, int(ki), dims=(-2, -1)) for xi, ki in zip(x, k)])


def corrupt_patches(
    x: torch.Tensor, patch: Sequence[int], ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a random `ratio` of each sample's patches: half zeroed, half replaced by noise.

    Args:
        x: `(B, C, *spatial)`, every spatial size a multiple of `patch`.
        patch: Patch size per spatial axis.
        ratio: Fraction of the patches corrupted (at least one per sample).
        generator: Random source.

    Returns:
        `(corrupted x, mask)`, the mask `(B, 1, *spatial)` True on corrupted voxels.
    """
    b, dims = x.shape[0], x.ndim - 2
    grid = [s // p for s, p in zip(x.shape[2:], patch)]
    if len(patch) != dims or any(g * p != s for g, p, s in zip(grid, patch, x.shape[2:])):
        raise ValueError(f"input {tuple(x.shape[2:])} is not a whole number of {tuple(patch)} patches")
    n = math.prod(grid)
    count = max(1, min(n, round(ratio * n)))
    scores = torch.rand(b, n, generator=generator, device="cpu")
    chosen = torch.zeros(b, n, dtype=torch.bool)
    chosen.scatter_(1, scores.argsort(1)[:, :count], True)
    noise_cell = torch.rand(b, n, generator=generator, device="cpu") < 0.5
    def up(cells: torch.Tensor) -> torch.Tensor:
        m = cells.view(b, 1, *grid).to(x.device)
        for axis, p in enumerate(patch):
            m = m.repeat_interleave(p, dim=2 + axis)
        return m

    mask, noisy = up(chosen), up(chosen & noise_cell)
    noise = torch.randn(x.shape, generator=generator, device="cpu").to(x) * x.std().clamp_min(1e-6) + x.mean()
    out = torch.where(mask, torch.zeros_like(x), x)
    out = torch.where(noisy, noise, out)
    return out, mask


class ReconstructionDecoder(nn.Module):
    """Two 1x1 convolutions and a pixel shuffle: a `(B, C, *grid)` map to `(B, in_chans, *grid * stride)`."""

    def __init__(self, spatial_dims: int, channels: int, in_chans: int, stride: Sequence[int]) -> None:
        super().__init__()
        conv = conv_nd(spatial_dims)
        self.stride = tuple(int(s) for s in stride)
        self.in_chans = in_chans
        self.net = nn.Sequential(conv(channels, channels, 1), nn.GELU(),
                                 conv(channels, in_chans * math.prod(self.stride), 1))  # fmt: skip

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        y = self.net(fmap)
        b, grid, d = y.shape[0], y.shape[2:], len(self.stride)
        y = y.view(b, self.in_chans, *self.stride, *grid)
        # (B, C, s1..sd, g1..gd) -> (B, C, g1, s1, ..., gd, sd)
        order = [0, 1] + [i for a in range(d) for i in (2 + d + a, 2 + a)]
        return y.permute(order).reshape(b, self.in_chans, *[g * s for g, s in zip(grid, self.stride)])


class SiT(nn.Module):
    """SiT-style multi-task pretraining around an encoder.

    Args:
        encoder: A registered backbone (or a segmenter's encoder); trained in place.
        in_chans: Input channels (what the decoder reconstructs).
        stride: The encoder's output stride per spatial axis (input size / map size).
        map_channels: Channels of the encoder's deepest map; None: `encoder.num_features`.
        in_dim: Width of the pooled vector; None: `encoder.num_features`.
        weights: Weights of the (rotation, reconstruction, contrastive) losses.
        corrupt_ratio: Fraction of patches corrupted.
        dim: Contrastive projection width.
        mlp_dim: Contrastive projector hidden width.
        T: Contrastive temperature.
    """

    def __init__(self, encoder: nn.Module, in_chans: int, stride: Sequence[int], map_channels: int | None = None,
                 in_dim: int | None = None, weights: Sequence[float] = (1.0, 1.0, 1.0), corrupt_ratio: float = 0.5,
                 dim: int = 256, mlp_dim: int = 2048, T: float = 0.2) -> None:  # fmt: skip
        super().__init__()
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"SiT needs 3 non-negative loss weights (rotation, reconstruction, contrast), got {weights}")
        if not 0.0 < corrupt_ratio <= 1.0:
            raise ValueError(f"corrupt_ratio must be in (0, 1], got {corrupt_ratio}")
        in_dim = int(in_dim or encoder.num_features)
        self.spatial_dims = len(stride)
        self.stride = tuple(int(s) for s in stride)
        self.weights = tuple(float(w) for w in weights)
        self.corrupt_ratio = corrupt_ratio
        self.T = T
        self.features = EncoderFeatures(encoder)
        self.rotation_head = nn.Linear(in_dim, NUM_ROTATIONS)
        self.projector = build_mlp(2, in_dim, mlp_dim, dim)
        self.decoder = ReconstructionDecoder(self.spatial_dims, int(map_channels or encoder.num_features), in_chans,
                                             self.stride)  # fmt: skip
        self.last_losses: dict[str, float] = {}
        self._hyper = dict(weights=list(self.weights), corrupt_ratio=corrupt_ratio, dim=dim, mlp_dim=mlp_dim, T=T)

    @property
    def encoder(self) -> nn.Module:
        return self.features.encoder

    def prepare(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(rotation labels k, rotated x, corrupted rotated x, corruption mask)` of a batch."""
        k = torch.randint(0, NUM_ROTATIONS, (x.shape[0],), generator=generator).to(x.device)
        target = rotate_batch(x, k)
        corrupted, mask = corrupt_patches(target, self.stride, self.corrupt_ratio, generator)
        return k, target, corrupted, mask

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The weighted loss of two views (components in `last_losses`)."""
        k, target, corrupted, mask = self.prepare(torch.cat([x1, x2]), generator)
        pooled, fmap = self.features(corrupted)
        rot = F.cross_entropy(self.rotation_head(pooled), k)
        rec = reconstruction_loss(self.decoder(fmap), target, mask)
        z = self.projector(pooled)
        n = x1.shape[0]
        ctr = contrastive_loss(z[:n], z[n:], self.T) + contrastive_loss(z[n:], z[:n], self.T)
        w_rot, w_rec, w_ctr = self.weights
        self.last_losses = {"rotation": float(rot.detach()), "reconstruction": float(rec.detach()),
                            "contrastive": float(ctr.detach())}  # fmt: skip
        return w_rot * rot + w_rec * rec + w_ctr * ctr

    def hyper_parameters(self) -> dict[str, object]:
        return dict(self._hyper)


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 error over the voxels where `mask` is True (all channels)."""
    m = mask.expand_as(target).to(pred.dtype)
    return ((pred - target).abs() * m).sum() / m.sum().clamp_min(1.0)
