"""timm TNT: blocks' sub-layers to `inner.*` / `outer.*`, q/k and v joined into qkv."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed
from medvit.convert.timm import register_timm_mapper
from medvit.models.image.tnt import TNT

# timm's TNT block sub-module -> ours (both transformers are plain `Block`s here)
_BLOCK_PARTS = {
    "norm_in": "inner.norm1",
    "attn_in": "inner.attn",
    "norm_mlp_in": "inner.norm2",
    "mlp_in": "inner.mlp",
    "norm_out": "outer.norm1",
    "attn_out": "outer.attn",
    "norm_mlp": "outer.norm2",
    "mlp": "outer.mlp",
}
_BLOCK_KEY = re.compile(r"^(blocks\.\d+)\.([a-z_]+)\.(.+)$")


@register_timm_mapper(TNT)
def _map_tnt(sd: StateDict, model: nn.Module) -> StateDict:
    if any(re.match(r"^blocks\.\d+\.proj\.bias$", k) for k in sd):
        raise ValueError(
            "this is timm's legacy TNT layout (tnt_s_legacy_patch16_224: pixel convolution "
            "before patch cutting, no norm2_proj); only the current layout is supported"
        )
    out: StateDict = {}
    for k, v in sd.items():
        m = _BLOCK_KEY.match(k)
        if m and m.group(2) in _BLOCK_PARTS:
            k = f"{m.group(1)}.{_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"
        out[k] = v
    # timm's attention has separate q/k and v projections; rows stack as q, k, v as in qkv
    for k in [k for k in out if k.endswith(".attn.qk.weight") or k.endswith(".attn.qk.bias")]:
        base, kind = k.rsplit(".qk.", 1)
        out[f"{base}.qkv.{kind}"] = torch.cat([out.pop(k), out.pop(f"{base}.v.{kind}")], dim=0)
    if "patch_pos" in out:
        out["patch_pos"] = fit_pos_embed(out["patch_pos"], model.grid_size, 1)
    return out
