"""Load MONAI `UNETR` and `ViT` state dicts into medvit's UNETR and VisionTransformer."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from medvit.convert._common import StateDict, fit_pos_embed, load_strict, unwrap
from medvit.models.image.vit import VisionTransformer
from medvit.models.volume.swin_unetr import SwinUNETR
from medvit.models.volume.unetr import UNETR

# MONAI ViT key -> medvit ViT key (applied in order, first match wins).
_VIT_RULES = [
    (r"^patch_embedding\.position_embeddings$", "pos_embed"),
    (r"^patch_embedding\.patch_embeddings\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^patch_embedding\.patch_embeddings\.1\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^blocks\.(\d+)\.mlp\.linear1\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.linear2\.", r"blocks.\1.mlp.fc2."),
    (r"^blocks\.(\d+)\.attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^classification_head\.(weight|bias)$", r"head.\1"),
]

# A MONAI UnetResBlock / UnetBasicBlock, relative to its own prefix.
_CONV_BLOCK_RULES = [
    (r"conv([12])\.conv\.", r"conv\1."),
    (r"conv3\.conv\.", "shortcut.0."),
    (r"norm3\.", "shortcut.1."),
]


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _vit_state(sd: StateDict, model: VisionTransformer) -> StateDict:
    out: StateDict = {}
    for k, v in sd.items():
        if re.match(r"^blocks\.\d+\.norm_cross_attn\.", k):
            continue  # created by MONAI's TransformerBlock but unused without cross-attention
        if k.startswith("classification_head.0."):
            raise ValueError(
                "MONAI ViT with a Tanh post-activation head has no medvit equivalent "
                "(build it with post_activation=None, or load with the head dropped)"
            )
        if k == "patch_embedding.patch_embeddings.1.weight":
            # perceptron patch embedding: Linear over (p1 p2 p3 c) -> conv kernel (c, p1, p2, p3)
            p = model.patch_size
            v = v.reshape(v.shape[0], *p, -1).movedim(-1, 1).contiguous()
        out[_rename(k, _VIT_RULES)] = v
    if "pos_embed" in out and isinstance(model.pos_embed, nn.Parameter):
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        out["pos_embed"] = fit_pos_embed(out["pos_embed"], model.grid_size, prefix)
    return out


def _conv_block(rest: str) -> str:
    return _rename(rest, _CONV_BLOCK_RULES)


def _unetr_decoder_key(k: str) -> str:
    m = re.match(r"^encoder1\.layer\.(.+)$", k)
    if m:
        return "stem." + _conv_block(m.group(1))
    m = re.match(r"^encoder(\d)\.transp_conv_init\.conv\.weight$", k)
    if m:
        return f"skips.{int(m.group(1)) - 2}.proj.weight"
    m = re.match(r"^encoder(\d)\.blocks\.(\d+)\.(.+)$", k)
    if m:
        stage, step, rest = int(m.group(1)) - 2, m.group(2), m.group(3)
        if rest.startswith("0.conv."):
            return f"skips.{stage}.steps.{step}.0.{rest[len('0.conv.'):]}"
        if rest.startswith("1."):
            return f"skips.{stage}.steps.{step}.1.{_conv_block(rest[2:])}"
        if rest.startswith("conv."):
            return f"skips.{stage}.steps.{step}.{rest[len('conv.'):]}"
    return up_path_key(k)


def up_path_key(k: str) -> str:
    """MONAI's `decoderN` up-blocks and `out` head (UNETR and Swin-UNETR) -> ours; others unchanged."""
    m = re.match(r"^decoder(\d)\.transp_conv\.conv\.(.+)$", k)
    if m:
        return f"ups.{5 - int(m.group(1))}.up.{m.group(2)}"
    m = re.match(r"^decoder(\d)\.conv_block\.(.+)$", k)
    if m:
        return f"ups.{5 - int(m.group(1))}.fuse.{_conv_block(m.group(2))}"
    m = re.match(r"^out\.conv\.conv\.(weight|bias)$", k)
    if m:
        return f"head.{m.group(1)}"
    return k


def load_monai(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a MONAI `UNETR` (into `UNETR`), `SwinUNETR` (into `SwinUNETR`) or `ViT` state dict.

    Loading is strict: every medvit parameter must be filled and every MONAI tensor used
    (only MONAI's unused cross-attention norms are skipped).

    Args:
        model: A medvit UNETR with a ViT encoder, a SwinUNETR, or a VisionTransformer.
        state_dict: MONAI's `model.state_dict()`.

    Returns:
        The model, loaded in place.

    Raises:
        ValueError: The weights do not fit the model (names or shapes).
    """
    sd = unwrap(state_dict)
    if isinstance(model, UNETR):
        if not isinstance(model.encoder, VisionTransformer):
            raise ValueError("MONAI UNETR weights need a UNETR with a ViT encoder")
        enc = {k[len("vit.") :]: v for k, v in sd.items() if k.startswith("vit.")}
        dec = {k: v for k, v in sd.items() if not k.startswith("vit.")}
        mapped = {"encoder." + k: v for k, v in _vit_state(enc, model.encoder).items()}
        mapped.update({_unetr_decoder_key(k): v for k, v in dec.items()})
        return load_strict(model, mapped, "MONAI UNETR")
    if isinstance(model, SwinUNETR):
        # imported here: the Swin mapping reuses this module's conv-block rules
        from medvit.convert.monai_swin import swin_unetr_state

        return load_strict(model, swin_unetr_state(sd, model), "MONAI SwinUNETR")
    if isinstance(model, VisionTransformer):
        return load_strict(model, _vit_state(sd, model), "MONAI ViT")
    raise ValueError(f"load_monai does not know how to load into {type(model).__name__}")
