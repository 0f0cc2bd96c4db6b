"""MedT: gated axial-attention networks trained with the Local-Global strategy, in 2D.

Valanarasu et al., "Medical Transformer: Gated Axial-Attention for Medical Image
Segmentation", MICCAI 2021.

Two branches see the image. The global branch (a convolutional stem and two stages of
gated axial transformer layers with relative position encodings) runs on the whole
image; the local branch (a stem and four deeper stages of axial layers without position
encodings, as the official `medt_net`) runs on every `patch_size` patch. Each branch
has a small decoder back to full resolution; their maps are added, fused by a 3x3 conv
and mapped to the classes by a 1x1 head. The local branch folds the patches into the
batch dimension instead of looping over them: the same result in eval mode, and in
training its batch norms see all patches at once rather than one patch position.

The relative tables tie the global branch to `img_size`. Smaller inputs whose sides are
multiples of `patch_size` are accepted: the tables are sliced to their centre (offsets
within the shorter axis) and the local branch sees fewer patches. Larger inputs raise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers.attention_capture import attention_layout
from medvit.layers.axial_attention import GatedAxialBlock
from medvit.layers.conv_blocks import PointwiseConv
from medvit.layers.helpers import to_ntuple
from medvit.registry import register_model


def _conv_bn_relu(in_chans: int, out_chans: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_chans), nn.ReLU())


class AxialBranch(nn.Module):
    """Stem, stages of gated axial layers and an additive-skip decoder (one MedT branch).

    The first stage keeps the stem's half resolution, every further one halves it. The
    decoder steps are official `medt_net`'s: 3x3 conv, bilinear 2x upsampling, ReLU, add
    the stage output of that resolution; `bottleneck` adds its first step (a stride-2 conv
    below the last stage, as the local branch's `decoder1_p`).

    Args:
        in_chans: Input channels.
        size: `(H, W)` input the relative tables are built for.
        stem_width: Stem output channels.
        stem_hidden: Channels of the stem's middle conv.
        widths: Attention width per stage (the stage outputs twice as many channels).
        depths: Layers per stage.
        num_heads: Attention heads.
        rel_pos: Relative encodings and gates in the attention.
        bottleneck: Extra stride-2 decoder step below the last stage.
    """

    def __init__(
        self,
        in_chans: int,
        size: tuple[int, int],
        stem_width: int,
        stem_hidden: int,
        widths: Sequence[int],
        depths: Sequence[int],
        num_heads: int,
        rel_pos: bool,
        bottleneck: bool,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn_relu(in_chans, stem_width, 7, stride=2),
            _conv_bn_relu(stem_width, stem_hidden, 3),
            _conv_bn_relu(stem_hidden, stem_width, 3),
        )
        grid = (size[0] // 2, size[1] // 2)
        chans = stem_width
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            blocks = [GatedAxialBlock(chans, width, num_heads, grid, stride, rel_pos)]
            grid = (grid[0] // stride, grid[1] // stride)
            chans = width * GatedAxialBlock.expansion
            blocks += [GatedAxialBlock(chans, width, num_heads, grid, 1, rel_pos) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        out_chans = [w * GatedAxialBlock.expansion for w in widths]
        self.bottleneck = nn.Conv2d(out_chans[-1], out_chans[-1], 3, stride=2, padding=1) if bottleneck else None
        # one step per skip, shallow-to-deep order reversed; the last step has no skip
        self.decoder = nn.ModuleList(
            nn.Conv2d(out_chans[i], out_chans[i - 1], 3, padding=1) for i in reversed(range(1, len(widths)))
        )
        self.final = nn.Conv2d(out_chans[0], widths[0], 3, padding=1)
        self.out_chans = widths[0]

    @staticmethod
    def _up(x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        skips = []
        for stage in self.stages:
            y = stage(y)
            skips.append(y)
        if self.bottleneck is not None:
            y = self._up(self.bottleneck(y)) + y
        for conv, skip in zip(self.decoder, reversed(skips[:-1])):
            y = self._up(conv(y)) + skip
        return self._up(self.final(y))


class MedT(nn.Module):
    """Medical Transformer: a global gated-axial branch plus a patch-wise local branch.

    The defaults are the official `MedT` configuration except for `in_chans` (1 for CT
    and MR slices; the official code takes RGB) and `num_classes` (14, as the other
    segmentation models here; the paper's tasks are binary, num_classes=2).

    Args:
        in_chans: Input channels (a slice, or a thin slab of neighbouring slices).
        num_classes: Output channels (classes, background included).
        img_size: Input (window) size `(H, W)`; an int is repeated.
        patch_size: Side of the local branch's patches; a multiple of
            `2 ** (len(depths) + 1)` dividing `img_size` (the model's total stride).
        width_factor: The paper's `s`: global stem width `64 s`, stage widths `128 s * 2^i`.
        depths: Layers per stage of the local branch.
        global_stages: Leading stages (of `depths`) in the global branch.
        num_heads: Attention heads of every layer.
        stem_hidden: Channels of the stems' middle conv (fixed to 128 in the official code).
        spatial_dims: 2 (MedT is a 2D model).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 14,
        img_size: int | Sequence[int] = 128,
        patch_size: int | Sequence[int] = 32,
        width_factor: float = 0.125,
        depths: Sequence[int] = (1, 2, 4, 1),
        global_stages: int = 2,
        num_heads: int = 8,
        stem_hidden: int = 128,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"MedT is a 2D model (spatial_dims=2), got spatial_dims={spatial_dims}")
        for name, value in (("in_chans", in_chans), ("num_classes", num_classes), ("stem_hidden", stem_hidden)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        depths = tuple(depths)
        if not depths or min(depths) < 1:
            raise ValueError(f"depths must be a non-empty sequence of positive ints, got {depths}")
        if not 1 <= global_stages <= len(depths):
            raise ValueError(f"global_stages must be in [1, {len(depths)}], got {global_stages}")
        self.spatial_dims = 2
        self.in_chans, self.num_classes = in_chans, num_classes
        self.img_size = to_ntuple(img_size, 2, "img_size")
        self.patch_size = to_ntuple(patch_size, 2, "patch_size")
        local_stride = 2 ** (len(depths) + 1)
        for img, patch in zip(self.img_size, self.patch_size):
            if patch < 1 or patch % local_stride:
                raise ValueError(
                    f"patch_size {self.patch_size} must be a multiple of {local_stride} for {len(depths)} stages"
                )
            if img % patch:
                raise ValueError(f"patch_size {self.patch_size} does not divide img_size {self.img_size}")
        widths = [int(128 * width_factor) * 2**i for i in range(len(depths))]
        stem_width = int(64 * width_factor)
        if stem_width < 1 or min(widths) % (2 * num_heads):
            raise ValueError(
                f"width_factor {width_factor} gives widths {widths}, which need stem width >= 1 and to be "
                f"multiples of 2 * num_heads = {2 * num_heads}"
            )
        self.global_branch = AxialBranch(
            in_chans,
            self.img_size,
            stem_width=stem_width,
            stem_hidden=stem_hidden,
            widths=widths[:global_stages],
            depths=depths[:global_stages],
            num_heads=num_heads,
            rel_pos=True,
            bottleneck=False,
        )
        # the official constructor builds the local stem after the global stages and reads
        # their running width, so the local stem is as wide as the global branch's output
        self.local_branch = AxialBranch(
            in_chans,
            self.patch_size,
            stem_width=widths[global_stages - 1] * GatedAxialBlock.expansion,
            stem_hidden=stem_hidden,
            widths=widths,
            depths=depths,
            num_heads=num_heads,
            rel_pos=False,
            bottleneck=True,
        )
        chans = self.global_branch.out_chans
        self.fuse = nn.Conv2d(chans, chans, 3, padding=1)
        self.head = PointwiseConv(2, chans, num_classes)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        if any(s % p or s > m for s, p, m in zip(size, self.patch_size, self.img_size)):
            raise ValueError(
                f"input size {size} must be a multiple of patch_size {self.patch_size} and at most "
                f"img_size {self.img_size} (the relative position tables' extent)"
            )

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """The local branch's full-resolution map, every patch processed independently."""
        b, c, h, w = x.shape
        (ph, pw), (gh, gw) = self.patch_size, (h // self.patch_size[0], w // self.patch_size[1])
        patches = x.view(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b * gh * gw, c, ph, pw)
        with attention_layout(tiles=(gh, gw)):  # every patch is its own sequence of rows / columns
            y = self.local_branch(patches)
        y = y.view(b, gh, gw, -1, ph, pw).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits `(B, num_classes, H, W)` for an input `(B, in_chans, H, W)`."""
        self._check_input(x)
        y = self.global_branch(x) + self.forward_local(x)
        return self.head(F.relu(self.fuse(y)))


@register_model
def medt(**kwargs: Any) -> MedT:
    """The paper's MedT: 128x128 input, 4x4 local patches of 32, s = 0.125, layers [1, 2, 4, 1]."""
    return MedT(**kwargs)
