"""ConViT: a ViT whose first blocks use gated positional self-attention.

d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft Convolutional
Inductive Biases", ICML 2021.

The first `local_up_to_layer` blocks use GPSA on the patch tokens alone; the class token
is inserted before the first ordinary (MHSA) block. The position table covers the patch
tokens only. Parameter names follow timm's, so its checkpoints load by identity.

Unlike timm's `ConVit`, `embed_dim` is the token width (as for every medvit model), not
the width per head: timm's `convit_small` (`embed_dim=48, num_heads=9`) is ours with
`embed_dim=432`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn

from medvit.layers import Attention, Block, grid_for
from medvit.layers.gpsa import GPSA
from medvit.layers.helpers import to_ntuple
from medvit.models._features import feature_take_last, format_intermediate
from medvit.models.image.vit import VisionTransformer
from medvit.registry import register_model


class ConViT(VisionTransformer):
    """ViT with `local_up_to_layer` leading GPSA blocks and a late class token.

    Args:
        img_size: Input size; fixed, since GPSA's positional attention is defined on the grid.
        patch_size: Patch extent.
        in_chans: Input channels.
        num_classes: Classifier outputs; 0 gives the pooled features.
        global_pool: `token`, `avg` (mean of patch tokens after the final norm, as timm),
            `map` or `` (no pooling).
        embed_dim: Token width (timm's `embed_dim * num_heads`).
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to `embed_dim`.
        qkv_bias: Bias of the query/key/value projections.
        local_up_to_layer: Number of leading GPSA blocks.
        locality_strength: Sharpness of GPSA's initial positional attention.
        drop_rate: Dropout before the classifier.
        pos_drop_rate: Dropout after adding the position embedding.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last block (linear schedule).
        norm_eps: LayerNorm epsilon.
        act_layer: MLP activation.
        freeze_patch_embed: Keep the random patch projection fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        local_up_to_layer: int = 10,
        locality_strength: float = 1.0,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if not 0 <= local_up_to_layer <= depth:
            raise ValueError(f"local_up_to_layer must be in [0, depth={depth}], got {local_up_to_layer}")
        has_mhsa = local_up_to_layer < depth
        if global_pool == "token" and not has_mhsa:
            raise ValueError(
                "global_pool='token' needs an MHSA block to carry the class token "
                f"(local_up_to_layer={local_up_to_layer} covers all {depth} blocks)"
            )
        grid = grid_for(to_ntuple(img_size, 2, "img_size"), to_ntuple(patch_size, 2, "patch_size"))
        gpsa = partial(GPSA, grid_size=grid, locality_strength=locality_strength)
        # VisionTransformer builds its blocks in order, once; each call takes the next kind
        attn_layers = iter([gpsa] * local_up_to_layer + [Attention] * (depth - local_up_to_layer))

        def block_fn(**kwargs: object) -> nn.Module:
            return Block(attn_layer=next(attn_layers), **kwargs)

        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=num_classes,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            class_token=has_mhsa,
            no_embed_class=True,
            fc_norm=False,
            drop_rate=drop_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            act_layer=act_layer,
            spatial_dims=2,
            freeze_patch_embed=freeze_patch_embed,
            block_fn=block_fn,
        )
        self.local_up_to_layer = local_up_to_layer

    def _init_weights(self) -> None:
        super()._init_weights()
        for m in self.modules():
            if isinstance(m, GPSA):
                m.local_init()

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        # the class token joins later, before the first MHSA block
        return self.pos_drop(x + self.pos_embed)

    def _prefix_count(self, block_index: int) -> int:
        """Class tokens present at the output of block `block_index`."""
        return self.num_prefix_tokens if block_index >= self.local_up_to_layer else 0

    def _run_block(
        self, x: torch.Tensor, i: int, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Block `i`, after inserting the class token if it joins here."""
        if i == self.local_up_to_layer and self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.blocks[i](x, return_attn=return_attn)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the last block and the final norm, `(B, 1 + N, D)`."""
        x, _ = self.embed(x)
        for i in range(len(self.blocks)):
            x = self._run_block(x, i)
        return self.norm(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
        return_prefix_tokens: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of selected blocks as `(B, D, H, W)` maps or `(B, N, D)` patch tokens.

        The class token (present from block `local_up_to_layer` on) is removed; with
        `return_prefix_tokens` each entry is `(map, prefix)`, the prefix empty for GPSA
        blocks. Arguments as `VisionTransformer.forward_intermediates`.
        """
        take, last = feature_take_last(len(self.blocks), indices, output_fmt, stop_early, intermediates_only)
        x, grid = self.embed(x)
        final_norm = self.norm if norm else None
        feats: list = []
        # not `collect_intermediates`: blocks run through `_run_block`, and the number of
        # prefix tokens depends on the block
        for i in range(last + 1):
            x = self._run_block(x, i)
            if i in take:
                feats.append(
                    format_intermediate(
                        x, grid, output_fmt, final_norm, self._prefix_count(i), return_prefix_tokens
                    )
                )
        if intermediates_only:
            return feats
        return self.norm(x), feats

    @torch.no_grad()
    def gating(self) -> torch.Tensor:
        """sigmoid(gate) of every GPSA block, `(local_up_to_layer, heads)`: 1 = positional."""
        gates = [blk.attn.gating_param for blk in self.blocks[: self.local_up_to_layer]]
        if not gates:
            return torch.empty(0)
        return torch.sigmoid(torch.stack(gates))


# -- registered variants ---------------------------------------------------------------
# The paper's Table 1: 48 channels per head, 12 blocks, the first 10 GPSA.
_CONVIT = dict(depth=12, local_up_to_layer=10, locality_strength=1.0)


@register_model
def convit_tiny(**kwargs: Any) -> ConViT:
    """ConViT-Ti, 4 heads of width 48, 224 px (d'Ascoli et al., 2021)."""
    return ConViT(**{**_CONVIT, **dict(embed_dim=192, num_heads=4), **kwargs})


@register_model
def convit_small(**kwargs: Any) -> ConViT:
    """ConViT-S, 9 heads of width 48, 224 px (d'Ascoli et al., 2021)."""
    return ConViT(**{**_CONVIT, **dict(embed_dim=432, num_heads=9), **kwargs})


@register_model
def convit_base(**kwargs: Any) -> ConViT:
    """ConViT-B, 16 heads of width 48, 224 px (d'Ascoli et al., 2021)."""
    return ConViT(**{**_CONVIT, **dict(embed_dim=768, num_heads=16), **kwargs})
