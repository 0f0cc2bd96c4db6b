"""CrossViT: two ViT branches at two patch sizes, fused by class-token cross-attention.

Chen, Fan and Panda, "CrossViT: Cross-Attention Multi-Scale Vision Transformer for Image
Classification", ICCV 2021.

A small-patch branch (12 px, narrow) and a large-patch branch (16 px, wide) each run
their own `Block`s. After them, each branch's class token is projected to the other
branch's width, attends over the other branch's patch tokens (`CrossAttentionBlock`) and
is projected back. One such exchange makes a multi-scale block; three are stacked. Each
branch has its own norm and classifier; the two logits are averaged.

As in timm, the 240 px input is fed to the large-patch branch resized to 224 px
(`img_scale=(1.0, 224/240)`, bicubic, or a centre crop with `crop_scale`), which is
what the paper's 224 px models saw; timm renamed them `*_240` after the real input.
Parameter names are timm's (`pos_embed_0`, `cls_token_1`, `blocks.0.fusion.1...`), except
the fusion attention's `wq/wk/wv`, which are the shared `ClassAttn`'s `q/k/v` here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from medvit.layers import Block, PatchEmbed, drop_path_schedule
from medvit.layers.cross_attention import CrossAttentionBlock
from medvit.layers.helpers import to_ntuple
from medvit.models._features import check_output_fmt, feature_take_indices, format_intermediate
from medvit.registry import register_model

_POOLS = ("token", "avg")


def _projection(
    dim_in: int, dim_out: int, norm_layer: Callable[[int], nn.Module], act_layer: Callable[[], nn.Module]
) -> nn.Sequential:
    """Norm -> activation -> linear, carrying a class token between branch widths."""
    return nn.Sequential(norm_layer(dim_in), act_layer(), nn.Linear(dim_in, dim_out))


class MultiScaleBlock(nn.Module):
    """Per-branch transformer blocks, then class-token cross-attention between branches.

    Branch `d`'s class token is fused with the patch tokens of branch `(d + 1) % n`.

    Args:
        embed_dim: Width of each branch.
        depth: Blocks of each branch, then the number of cross-attention blocks per
            fusion; 0 means one, stored unwrapped (timm's layout, used by every
            released CrossViT). Stacked fusion blocks pass on only the class token, as
            in timm.
        num_heads: Heads of each branch (the fusion into a branch's width uses its heads).
        mlp_ratio: MLP ratio of each branch.
        qkv_bias: Bias of the q/k/v projections.
        proj_drop: Dropout after attention/MLP projections.
        attn_drop: Dropout on attention weights.
        drop_path: Stochastic depth per position in this block: branch block `i` uses
            entry `i`, the fusion the last entry.
        act_layer: Activation of the MLPs and the projections.
        norm_layer: Norm class.
    """

    def __init__(
        self,
        embed_dim: Sequence[int],
        depth: Sequence[int],
        num_heads: Sequence[int],
        mlp_ratio: Sequence[float],
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] = (0.0,),
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        n = self.num_branches = len(embed_dim)
        *branch_depth, fusion_depth = depth
        drop = dict(proj_drop=proj_drop, attn_drop=attn_drop)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                *[
                    Block(
                        embed_dim[d], num_heads[d], mlp_ratio=mlp_ratio[d], qkv_bias=qkv_bias,
                        drop_path=drop_path[i], act_layer=act_layer, norm_layer=norm_layer, **drop,
                    )
                    for i in range(branch_depth[d])
                ]
            )
            for d in range(n)
        )
        self.projs = nn.ModuleList(
            _projection(embed_dim[d], embed_dim[(d + 1) % n], norm_layer, act_layer) for d in range(n)
        )

        def fusion_block(d: int) -> nn.Module:
            other = (d + 1) % n
            return CrossAttentionBlock(
                embed_dim[other], num_heads[other], qkv_bias=qkv_bias, drop_path=drop_path[-1],
                norm_layer=norm_layer, **drop,
            )

        self.fusion = nn.ModuleList(
            fusion_block(d) if fusion_depth == 0
            else nn.Sequential(*[fusion_block(d) for _ in range(fusion_depth)])
            for d in range(n)
        )
        self.revert_projs = nn.ModuleList(
            _projection(embed_dim[(d + 1) % n], embed_dim[d], norm_layer, act_layer) for d in range(n)
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [blocks(x) for blocks, x in zip(self.blocks, xs)]
        outs = []
        for d in range(self.num_branches):
            other = xs[(d + 1) % self.num_branches]
            cls = self.projs[d](xs[d][:, :1])
            cls = self.fusion[d](torch.cat([cls, other[:, 1:]], dim=1))
            outs.append(torch.cat([self.revert_projs[d](cls[:, :1]), xs[d][:, 1:]], dim=1))
        return outs


class CrossViT(nn.Module):
    """Multi-branch ViT with cross-attention fusion of the class tokens.

    Args:
        img_size: Input size (fixed; a different size raises instead of being resized).
        img_scale: Per branch, the factor its input is resized (or cropped) by.
        patch_size: Patch size of each branch.
        in_chans: Input channels.
        num_classes: Classifier outputs (one head per branch, logits averaged); 0 gives the
            branches' pooled features concatenated.
        global_pool: `token` (class tokens) or `avg` (mean of each branch's patch tokens).
        embed_dim: Width of each branch.
        depth: One entry per multi-scale block: blocks of each branch, then the fusion
            depth (see `MultiScaleBlock`).
        num_heads: Heads of each branch.
        mlp_ratio: MLP ratio of each branch.
        qkv_bias: Bias of the q/k/v projections.
        crop_scale: Centre-crop instead of resizing a branch's input when it is smaller.
        drop_rate: Dropout before the classifiers.
        pos_drop_rate: Dropout after adding the position embeddings.
        proj_drop_rate: Dropout after attention/MLP projections.
        attn_drop_rate: Dropout on attention weights.
        drop_path_rate: Stochastic depth of the last layer (linear schedule over the
            deepest branch plus the fusion of every multi-scale block).
        norm_eps: LayerNorm epsilon.
        act_layer: Activation.
        freeze_patch_embed: Keep every branch's random patch projection fixed (MoCo v3).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        img_scale: Sequence[float] = (1.0, 1.0),
        patch_size: Sequence[int] = (8, 16),
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: Sequence[int] = (192, 384),
        depth: Sequence[Sequence[int]] = ((1, 3, 1), (1, 3, 1), (1, 3, 1)),
        num_heads: Sequence[int] = (6, 12),
        mlp_ratio: Sequence[float] = (2.0, 2.0),
        qkv_bias: bool = True,
        crop_scale: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        freeze_patch_embed: bool = False,
    ) -> None:
        super().__init__()
        self._check_pool(global_pool)
        n = len(embed_dim)
        if n < 2:
            raise ValueError(f"CrossViT needs at least two branches, got embed_dim={tuple(embed_dim)}")
        per_branch = dict(
            img_scale=img_scale, patch_size=patch_size, num_heads=num_heads, mlp_ratio=mlp_ratio
        )
        for name, value in per_branch.items():
            if len(value) != n:
                raise ValueError(f"{name} needs one value per branch ({n}), got {tuple(value)}")
        if not depth:
            raise ValueError("depth needs at least one multi-scale block")
        for cfg in depth:
            if len(cfg) != n + 1 or min(cfg) < 0 or min(cfg[:-1]) < 1:
                raise ValueError(
                    f"each depth entry needs {n} branch depths >= 1 and a fusion depth >= 0, "
                    f"got {tuple(cfg)}"
                )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.spatial_dims = 2
        self.num_branches = n
        self.embed_dim = tuple(embed_dim)
        self.num_features = sum(embed_dim)
        self.num_prefix_tokens = 1
        self.crop_scale = crop_scale
        self.img_size = to_ntuple(img_size, 2, "img_size")
        # int() truncation as timm, so the same sizes come out
        self.img_size_scaled = [tuple(int(s * sc) for s in self.img_size) for sc in img_scale]

        self.patch_embed = nn.ModuleList(
            PatchEmbed(2, size, p, in_chans, d)
            for size, p, d in zip(self.img_size_scaled, patch_size, embed_dim)
        )
        if freeze_patch_embed:
            self.patch_embed.requires_grad_(False)
        for i, (pe, d) in enumerate(zip(self.patch_embed, embed_dim)):
            setattr(self, f"pos_embed_{i}", nn.Parameter(torch.zeros(1, 1 + pe.num_patches, d)))
            setattr(self, f"cls_token_{i}", nn.Parameter(torch.zeros(1, 1, d)))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        sizes = [max(cfg[:-1]) + cfg[-1] for cfg in depth]
        dpr = drop_path_schedule(drop_path_rate, sum(sizes))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.blocks = nn.ModuleList(
            MultiScaleBlock(
                embed_dim, cfg, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[start : start + size],
                act_layer=act_layer, norm_layer=norm_layer,
            )
            for cfg, start, size in zip(depth, starts, sizes)
        )
        self.norm = nn.ModuleList(norm_layer(d) for d in embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._heads(num_classes)
        self._init_weights()

    @staticmethod
    def _check_pool(global_pool: str) -> None:
        if global_pool not in _POOLS:
            raise ValueError(f"CrossViT supports global_pool in {_POOLS}, got {global_pool!r}")

    def _heads(self, num_classes: int) -> nn.ModuleList:
        return nn.ModuleList(
            nn.Linear(d, num_classes) if num_classes > 0 else nn.Identity() for d in self.embed_dim
        )

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i in range(self.num_branches):
            nn.init.trunc_normal_(getattr(self, f"pos_embed_{i}"), std=0.02)
            nn.init.trunc_normal_(getattr(self, f"cls_token_{i}"), std=0.02)

    @property
    def grid_sizes(self) -> list[tuple[int, ...]]:
        """Token grid of each branch."""
        return [pe.grid_size for pe in self.patch_embed]

    def _scale_image(self, x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) == size:
            return x
        if self.crop_scale and size[0] <= h and size[1] <= w:
            top, left = int(round((h - size[0]) / 2.0)), int(round((w - size[1]) / 2.0))
            return x[:, :, top : top + size[0], left : left + size[1]]
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    def embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Tokens of each branch (class token first, position embedding added)."""
        if x.ndim != 4 or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"expected input (batch, channels, {self.img_size[0]}, {self.img_size[1]}), "
                f"got shape {tuple(x.shape)}"
            )
        xs = []
        for i, (pe, size) in enumerate(zip(self.patch_embed, self.img_size_scaled)):
            tokens = pe(self._scale_image(x, size))
            cls = getattr(self, f"cls_token_{i}").expand(x.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1) + getattr(self, f"pos_embed_{i}")
            xs.append(self.pos_drop(tokens))
        return xs

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each branch's tokens after the last block and its norm, `[(B, 1 + N_b, D_b)]`."""
        xs = self.embed(x)
        for blk in self.blocks:
            xs = blk(xs)
        return [norm(t) for norm, t in zip(self.norm, xs)]

    def forward_head(self, xs: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        """Pool each branch; average the branches' logits, or concatenate the pooled vectors
        with `pre_logits` or `num_classes=0`."""
        pooled = [t[:, 1:].mean(dim=1) if self.global_pool == "avg" else t[:, 0] for t in xs]
        pooled = [self.head_drop(p) for p in pooled]
        if pre_logits or self.num_classes == 0:
            return torch.cat(pooled, dim=1)
        return torch.stack([head(p) for head, p in zip(self.head, pooled)]).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        stop_early: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Patch tokens of each branch at the output of each multi-scale block.

        Indices are branch-major, as timm's: with `D` multi-scale blocks, index
        `b * D + i` is branch `b` after block `i` (so 0..D-1 are the small-patch branch,
        at its own grid, and D..2D-1 the large-patch one). The class tokens are removed.

        Args:
            x: Input `(B, C, H, W)`.
            indices: Features to return: None = all, n = the last n, or a list.
            norm: Apply the branch's final norm to each intermediate.
            output_fmt: `NCHW` (`(B, D_b, *grid_b)` maps) or `NLC` (`(B, N_b, D_b)`).
            intermediates_only: Return only the list.
            stop_early: Stop after the last block any requested feature needs (only
                with `intermediates_only`).

        Returns:
            The intermediates (sorted by index), or `(final, intermediates)` where `final`
            is what `forward_features` returns.
        """
        check_output_fmt(output_fmt)
        num_blocks = len(self.blocks)
        take = feature_take_indices(self.num_branches * num_blocks, indices)
        last = num_blocks - 1
        if stop_early and intermediates_only:
            last = max(i % num_blocks for i in take)
        xs = self.embed(x)
        per_branch: list[list[torch.Tensor]] = [[] for _ in range(self.num_branches)]
        for i, blk in enumerate(self.blocks[: last + 1]):
            xs = blk(xs)
            for b in range(self.num_branches):
                if b * num_blocks + i in take:
                    final_norm = self.norm[b] if norm else None
                    y = format_intermediate(xs[b], self.grid_sizes[b], output_fmt, final_norm, 1)
                    per_branch[b].append(y)
        feats = [y for branch in per_branch for y in branch]
        if intermediates_only:
            return feats
        return [norm(t) for norm, t in zip(self.norm, xs)], feats

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifiers (and optionally the pooling); 0 removes them."""
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._heads(num_classes)


# -- registered variants ---------------------------------------------------------------
# The paper's Table 1 (timm's names): 12 px and 16 px branches at 240 px (the large branch
# sees 224 px), three multi-scale blocks each with one small-branch block, K large-branch
# blocks and one cross-attention.
_CROSSVIT = dict(img_size=240, img_scale=(1.0, 224 / 240), patch_size=(12, 16))


@register_model
def crossvit_tiny_240(**kwargs: Any) -> CrossViT:
    """CrossViT-Ti: widths 96/192, 3 heads, MLP 4, 240 px (Chen et al., 2021)."""
    cfg = dict(embed_dim=(96, 192), depth=((1, 4, 0),) * 3, num_heads=(3, 3), mlp_ratio=(4.0, 4.0))
    return CrossViT(**{**_CROSSVIT, **cfg, **kwargs})


@register_model
def crossvit_small_240(**kwargs: Any) -> CrossViT:
    """CrossViT-S: widths 192/384, 6 heads, MLP 4, 240 px (Chen et al., 2021)."""
    cfg = dict(embed_dim=(192, 384), depth=((1, 4, 0),) * 3, num_heads=(6, 6), mlp_ratio=(4.0, 4.0))
    return CrossViT(**{**_CROSSVIT, **cfg, **kwargs})


@register_model
def crossvit_base_240(**kwargs: Any) -> CrossViT:
    """CrossViT-B: widths 384/768, 12 heads, MLP 4, 240 px (Chen et al., 2021)."""
    cfg = dict(embed_dim=(384, 768), depth=((1, 4, 0),) * 3, num_heads=(12, 12), mlp_ratio=(4.0, 4.0))
    return CrossViT(**{**_CROSSVIT, **cfg, **kwargs})


@register_model
def crossvit_9_240(**kwargs: Any) -> CrossViT:
    """CrossViT-9: widths 128/256, 4 heads, MLP 3, 240 px (Chen et al., 2021)."""
    cfg = dict(embed_dim=(128, 256), depth=((1, 3, 0),) * 3, num_heads=(4, 4), mlp_ratio=(3.0, 3.0))
    return CrossViT(**{**_CROSSVIT, **cfg, **kwargs})


@register_model
def crossvit_15_240(**kwargs: Any) -> CrossViT:
    """CrossViT-15: widths 192/384, 6 heads, MLP 3, 240 px (Chen et al., 2021)."""
    cfg = dict(embed_dim=(192, 384), depth=((1, 5, 0),) * 3, num_heads=(6, 6), mlp_ratio=(3.0, 3.0))
    return CrossViT(**{**_CROSSVIT, **cfg, **kwargs})


@register_model
def crossvit_18_240(**kwargs: Any) -> CrossViT:
    """CrossViT-18: widths 224/448, 7 heads, MLP 3, 240 px (Chen et al., 2021)."""
    cfg = dict(embed_dim=(224, 448), depth=((1, 6, 0),) * 3, num_heads=(7, 7), mlp_ratio=(3.0, 3.0))
    return CrossViT(**{**_CROSSVIT, **cfg, **kwargs})
