"""CPVT: a ViT whose position information comes from a conv over the tokens, not a table.

Chu et al., "Conditional Positional Encodings for Vision Transformers", ICLR 2023.

The position table is removed; a positional encoding generator (`medvit.layers.peg.PEG`,
a residual 3x3 depthwise conv on the token grid) after the first block gives the tokens
positions conditioned on their neighbourhood. Nothing depends on the number of tokens,
so the model takes any input size the patch divides (`dynamic_img_size` is on by
default). The registered models are the paper's CPVT-GAP: no class token, the normed
tokens averaged (global average pooling) for the classifier, DeiT's widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medvit.layers.peg import PEG
from medvit.models._features import feature_take_last, format_intermediate
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class CPVT(VisionTransformer):
    """ViT with a PEG after block `peg_index` and no position table.

    Args:
        img_size: Nominal input size (the registry's and `img_size` attribute's); other
            sizes the patch divides are accepted while `dynamic_img_size` is on.
        patch_size: Patch extent.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `avg` (CPVT-GAP), `token` (CPVT with a class token), `map` or ``.
        class_token: Prepend a class token; None: only for `global_pool='token'`.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads.
        peg_index: The PEG follows this block (0, after the first, is the paper's best).
        peg_kernel: Kernel extent of the PEG's depthwise conv.
        dynamic_img_size: Accept any input size the patch divides.
        **kwargs: The remaining `VisionTransformer` arguments (`mlp_ratio`,
            `drop_path_rate`, `fc_norm`, ...); position tables do not apply.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        class_token: bool | None = None,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        peg_index: int = 0,
        peg_kernel: int = 3,
        dynamic_img_size: bool = True,
        **kwargs: Any,
    ) -> None:
        if "pos_embed" in kwargs or "no_embed_class" in kwargs:
            raise ValueError("CPVT has no position table (its positions come from the PEG)")
        if not 0 <= peg_index < depth:
            raise ValueError(f"peg_index must be a block index in [0, {depth}), got {peg_index}")
        # the paper's GAP head normalises the tokens, then averages them
        kwargs.setdefault("fc_norm", False)
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            class_token=global_pool == "token" if class_token is None else class_token,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            pos_embed="none",
            dynamic_img_size=dynamic_img_size,
            **kwargs,
        )
        self.peg_index = peg_index
        self.pos_block = PEG(self.spatial_dims, embed_dim, peg_kernel)

    def _run_blocks(
        self, x: torch.Tensor, grid: tuple[int, ...], last: int, take: Sequence[int] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks 0..last with the PEG after block `peg_index`; outputs of blocks in `take`."""
        taken = []
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = blk(x)
            if i == self.peg_index:
                x = self.pos_block(x, grid, self.num_prefix_tokens)
            if i in take:
                taken.append(x)
        return x, taken

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, `(B, prefix + N, D)`."""
        x, grid = self.embed(x)
        x, _ = self._run_blocks(x, grid, len(self.blocks) - 1)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of selected blocks (block `peg_index`'s with the PEG applied).

        Arguments and return value as the common interface (`medvit.models._features`).

        Args:
            x: Input `(B, C, H, W)`.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        x, grid = self.embed(x)
        x, taken = self._run_blocks(x, grid, last, take)
        final_norm = self.norm if norm else None
        feats = [format_intermediate(y, grid, output_fmt, final_norm, self.num_prefix_tokens) for y in taken]
        return feats if intermediates_only else (self.norm(x), feats)


# -- registered variants ---------------------------------------------------------------
# DeiT's Ti/S/B widths (Table 1 of DeiT), as the paper's CPVT-Ti/S/B with global average pooling.
_CPVT = dict(img_size=224, patch_size=16, depth=12, global_pool="avg")


@register_model
def cpvt_tiny(**kwargs: Any) -> CPVT:
    """CPVT-Ti-GAP, width 192, 3 heads, 224 px (Chu et al., 2023)."""
    return CPVT(**{**_CPVT, **dict(embed_dim=192, num_heads=3), **kwargs})


@register_model
def cpvt_small(**kwargs: Any) -> CPVT:
    """CPVT-S-GAP, width 384, 6 heads, 224 px (Chu et al., 2023)."""
    return CPVT(**{**_CPVT, **dict(embed_dim=384, num_heads=6), **kwargs})


@register_model
def cpvt_base(**kwargs: Any) -> CPVT:
    """CPVT-B-GAP, width 768, 12 heads, 224 px (Chu et al., 2023)."""
    return CPVT(**{**_CPVT, **dict(embed_dim=768, num_heads=12), **kwargs})
