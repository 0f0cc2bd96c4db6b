"""TimeSformer from a ViT image checkpoint (the paper's ImageNet initialisation).

The patch embedding is frame-wise 2D, so it is copied as is (`tubelet_init` has nothing
to choose). The spatial position table is the image's (resampled to the frame grid when
it differs), the temporal embedding is zero, and every extra attention step (temporal,
width, local) takes a copy of the block's image attention and norm, as the official code
does, with its output projection zero so the model starts as the image model per frame.
A classifier of the video model's shape is copied; otherwise the video model keeps its own.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed
from medvit.convert.inflate import register_inflater
from medvit.layers.video_attention import FactorisedSpaceTimeBlock
from medvit.models.video.timesformer import TimeSformer


@register_inflater(TimeSformer)
def inflate_timesformer(image_sd: StateDict, model: nn.Module, tubelet_init: str) -> StateDict:
    """Video state dict of `model` built from a ViT state dict of the same width."""
    target = model.state_dict()
    width = image_sd["cls_token"].shape[-1] if "cls_token" in image_sd else None
    if width != model.embed_dim:
        raise ValueError(
            f"image checkpoint width {width} does not match the TimeSformer width {model.embed_dim}"
        )
    missing = [k for k in target if not k.startswith(("head.", "time_embed")) and k not in image_sd]
    missing = [k for k in missing if not any(f"_{s}" in k for s in ("attn.", "norm1.", "fc."))]
    if missing:
        raise ValueError(
            f"image checkpoint lacks {len(missing)} keys the TimeSformer needs, e.g. {missing[:3]}"
        )
    out: StateDict = {}
    for key, value in target.items():
        src = image_sd.get(key)
        if key == "pos_embed" and src is not None:
            out[key] = fit_pos_embed(src, model.grid_size, num_prefix_tokens=1)
        elif key == "time_embed":
            out[key] = torch.zeros_like(value)
        elif key.startswith("head."):
            out[key] = src if src is not None and src.shape == value.shape else value
        elif src is not None:
            out[key] = src
        else:
            out[key] = value
    for i, blk in enumerate(model.blocks):
        if not isinstance(blk, FactorisedSpaceTimeBlock):
            continue
        p = f"blocks.{i}."
        for name, _ in blk.steps:
            for part, image_part in ((f"{name}_attn", "attn"), (f"{name}_norm1", "norm1")):
                for key in target:
                    if key.startswith(p + image_part + "."):
                        out[p + part + key[len(p + image_part) :]] = image_sd[key]
            out[f"{p}{name}_fc.weight"] = torch.zeros_like(target[f"{p}{name}_fc.weight"])
            out[f"{p}{name}_fc.bias"] = torch.zeros_like(target[f"{p}{name}_fc.bias"])
    return out
