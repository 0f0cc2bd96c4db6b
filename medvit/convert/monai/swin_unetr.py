"""MONAI `SwinUNETR` state dict -> medvit `SwinUNETR` (default `downsample="merging"`, `use_v2=False`).

MONAI merges patches at the end of each stage, medvit at the start of the next (the last
merge is medvit's merge-only final stage), and MONAI's v0.9 3D merging concatenates the
2 x 2 x 2 neighbours in another order, so the merge norm and reduction are permuted.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.monai import register_monai_mapper
from medvit.convert.monai._decoder import conv_block_key, up_path_key
from medvit.models.volume.swin_unetr import SwinUNETR

MONAI_STAGES = 4
# MONAI's `PatchMerging` slot m holds the (d, h, w) offset _MONAI_3D[m]
_MONAI_3D = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
# ours: slot s holds the offset with the last axis slowest, s = w * 4 + h * 2 + d
_MERGE_ORDER_3D = [_MONAI_3D.index((s & 1, (s >> 1) & 1, (s >> 2) & 1)) for s in range(8)]


def _encoder_key(k: str) -> str:
    m = re.match(r"^layers(\d)\.0\.blocks\.(\d+)\.(.+)$", k)
    if m:
        rest = re.sub(r"^mlp\.linear([12])\.", r"mlp.fc\1.", m.group(3))
        return f"layers.{int(m.group(1)) - 1}.blocks.{m.group(2)}.{rest}"
    m = re.match(r"^layers(\d)\.0\.downsample\.(.+)$", k)
    if m:
        return f"layers.{int(m.group(1))}.downsample.{m.group(2)}"
    return k


def _merge_weight(v: torch.Tensor) -> torch.Tensor:
    """Permute the 8 neighbour blocks of a merge norm/reduction's input axis into our order."""
    c = v.shape[-1] // 8
    return v.reshape(*v.shape[:-1], 8, c)[..., _MERGE_ORDER_3D, :].flatten(-2)


def _decoder_key(k: str) -> str:
    m = re.match(r"^encoder(\d+)\.layer\.(.+)$", k)
    if m:
        n, rest = int(m.group(1)), conv_block_key(m.group(2))
        if n == 1:
            return f"stem.{rest}"
        if n == 10:
            return f"bottleneck.{rest}"
        return f"skips.{n - 2}.{rest}"
    return up_path_key(k)


@register_monai_mapper(SwinUNETR, "MONAI SwinUNETR")
def map_swin_unetr(sd: StateDict, model: nn.Module) -> StateDict:
    """Rename (and, for 3D merges, permute) a MONAI SwinUNETR state dict for `model`.

    Raises:
        ValueError: The model does not have MONAI's four stages, or the checkpoint is a
            Swin-UNETR v2 (`use_v2=True`), which has no medvit equivalent.
    """
    if len(model.encoder.layers) != MONAI_STAGES + 1:
        raise ValueError(
            f"MONAI SwinUNETR has {MONAI_STAGES} stages; the model has {len(model.encoder.layers) - 1}"
        )
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("swinViT."):
            rest = k[len("swinViT.") :]
            if re.match(r"^layers\dc\.", rest):
                raise ValueError("MONAI SwinUNETR v2 weights (use_v2=True) have no medvit equivalent")
            if rest.endswith("relative_position_index"):
                continue  # derived from the window; ours is rebuilt, not loaded
            if ".downsample." in rest and model.spatial_dims == 3:
                v = _merge_weight(v)
            out["encoder." + _encoder_key(rest)] = v
        else:
            out[_decoder_key(k)] = v
    return out
