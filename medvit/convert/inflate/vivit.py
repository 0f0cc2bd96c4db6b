"""Inflate a 2D ViT checkpoint into ViViT (paper Sec. 3.4).

Tubelet kernels are the 2D kernel in the central frame (`central`) or spread evenly over
the tubelet (`average`, "filter inflation"); the position table is the image's repeated
over time; the factorised self-attention model's temporal attention gets a zero output
projection so each block starts as the image block applied frame by frame. Parts the
image model lacks (temporal norms and q/k/v, the factorised encoder's temporal
transformer, the classifier) keep the video model's own initialisation.
"""

from __future__ import annotations

import torch

from medvit.convert._common import StateDict, fit_pos_embed
from medvit.convert.inflate import register_inflater
from medvit.models.video.vivit import ViViT


def _tubelet_kernel(w2d: torch.Tensor, length: int, tubelet_init: str) -> torch.Tensor:
    """`(D, C, p, p)` image kernel to a `(D, C, length, p, p)` tubelet kernel."""
    if tubelet_init == "average":
        return w2d.unsqueeze(2).repeat(1, 1, length, 1, 1) / length
    w = w2d.new_zeros(w2d.shape[0], w2d.shape[1], length, *w2d.shape[2:])
    w[:, :, length // 2] = w2d
    return w


@register_inflater(ViViT)
def inflate_vivit(image_sd: StateDict, model: ViViT, tubelet_init: str) -> StateDict:
    """Image ViT state dict (timm / medvit key names) to a full ViViT state dict."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w2d = image_sd.get("patch_embed.proj.weight")
    if w2d is None or w2d.ndim != 4:
        raise ValueError("the image checkpoint has no 2D patch embedding 'patch_embed.proj.weight'")
    if w2d.shape[0] != model.embed_dim or w2d.shape[2:] != sd["patch_embed.proj.weight"].shape[3:]:
        raise ValueError(
            f"image patch embedding {tuple(w2d.shape)} does not fit the video model "
            f"(width {model.embed_dim}, tubelet {tuple(sd['patch_embed.proj.weight'].shape[2:])})"
        )
    sd["patch_embed.proj.weight"] = _tubelet_kernel(w2d, sd["patch_embed.proj.weight"].shape[2], tubelet_init)
    sd["patch_embed.proj.bias"] = image_sd["patch_embed.proj.bias"]

    t, h, w = model.grid_size
    has_cls = "cls_token" in image_sd
    pos = fit_pos_embed(image_sd["pos_embed"], (h, w), int(has_cls))
    cls_pos, patch_pos = pos[:, : int(has_cls)], pos[:, int(has_cls) :]
    if model.attention_type in ("st", "fe"):
        # an image model without class token leaves the video model's own class position
        cls_pos = cls_pos if has_cls else sd["pos_embed"][:, :1]
        repeats = t if model.attention_type == "st" else 1
        sd["pos_embed"] = torch.cat([cls_pos, patch_pos.repeat(1, repeats, 1)], 1)
    else:
        sd["pos_embed"] = patch_pos.repeat(1, t, 1)
    if model.cls_token is not None and has_cls:
        sd["cls_token"] = image_sd["cls_token"]

    n_img = len({k.split(".")[1] for k in image_sd if k.startswith("blocks.")})
    if n_img != len(model.blocks):
        raise ValueError(f"the image checkpoint has {n_img} blocks, the video model {len(model.blocks)}")
    for k, v in image_sd.items():
        if k.startswith("blocks.") or k.startswith("norm."):
            if k not in sd:
                raise ValueError(f"image checkpoint key {k!r} has no place in the video model")
            sd[k] = v
    if model.attention_type == "fsa":
        for k in sd:
            if ".temporal_attn.proj." in k:
                sd[k] = torch.zeros_like(sd[k])
    return sd
