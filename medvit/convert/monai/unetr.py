"""MONAI `UNETR` state dict -> medvit `UNETR` with a ViT encoder."""

from __future__ import annotations

import re

import torch.nn as nn

from medvit.convert._common import StateDict
from medvit.convert.monai import register_monai_mapper
from medvit.convert.monai._decoder import conv_block_key, up_path_key
from medvit.convert.monai.vit import map_vit
from medvit.models.image.vit import VisionTransformer
from medvit.models.volume.unetr import UNETR


def _decoder_key(k: str) -> str:
    m = re.match(r"^encoder1\.layer\.(.+)$", k)
    if m:
        return "stem." + conv_block_key(m.group(1))
    m = re.match(r"^encoder(\d)\.transp_conv_init\.conv\.weight$", k)
    if m:
        return f"skips.{int(m.group(1)) - 2}.proj.weight"
    m = re.match(r"^encoder(\d)\.blocks\.(\d+)\.(.+)$", k)
    if m:
        stage, step, rest = int(m.group(1)) - 2, m.group(2), m.group(3)
        if rest.startswith("0.conv."):
            return f"skips.{stage}.steps.{step}.0.{rest[len('0.conv.'):]}"
        if rest.startswith("1."):
            return f"skips.{stage}.steps.{step}.1.{conv_block_key(rest[2:])}"
        if rest.startswith("conv."):
            return f"skips.{stage}.steps.{step}.{rest[len('conv.'):]}"
    return up_path_key(k)


@register_monai_mapper(UNETR, "MONAI UNETR")
def map_unetr(sd: StateDict, model: nn.Module) -> StateDict:
    """The MONAI ViT under `vit.` mapped onto our encoder; the decoder keys renamed.

    Raises:
        ValueError: The model's encoder is not a ViT.
    """
    if not isinstance(model.encoder, VisionTransformer):
        raise ValueError("MONAI UNETR weights need a UNETR with a ViT encoder")
    enc = {k[len("vit.") :]: v for k, v in sd.items() if k.startswith("vit.")}
    dec = {k: v for k, v in sd.items() if not k.startswith("vit.")}
    mapped = {"encoder." + k: v for k, v in map_vit(enc, model.encoder).items()}
    mapped.update({_decoder_key(k): v for k, v in dec.items()})
    return mapped
