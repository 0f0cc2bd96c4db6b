"""Space-time attention pieces for video transformers: token grouping and factorised blocks.

Patch tokens of a clip are kept as one sequence `(B, T*H*W, D)` in (t, h, w) order. A
*grouping* cuts that grid into independent attention sequences; each axis is either
windowed (contiguous runs of `w` tokens attend together) or strided (tokens `s` apart
attend together). Divided, axial and local-global attention (TimeSformer) and the
factorised encoders of ViViT are all sequences of such groupings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from medvit.layers.attention import Attention
from medvit.layers.attention_capture import attention_layout
from medvit.layers.drop import DropPath
from medvit.layers.mlp import Mlp

# Per axis (t, h, w): ("window", w) or ("stride", s); "full" and "one" are shorthands.
AxisSpec = tuple[str, int]
Grouping = tuple[AxisSpec, AxisSpec, AxisSpec]

FULL: AxisSpec = ("window", -1)
ONE: AxisSpec = ("window", 1)
GROUPINGS: dict[str, Grouping] = {
    "time": (FULL, ONE, ONE),
    "space": (ONE, FULL, FULL),
    "width": (ONE, ONE, FULL),
    "height": (ONE, FULL, ONE),
    "joint": (FULL, FULL, FULL),
    # local-global (TimeSformer's L+G): all frames x a quarter of the frame, then stride 2
    "local": (FULL, ("window", -2), ("window", -2)),
    "global": (("stride", 2), ("stride", 2), ("stride", 2)),
}


def _axis_split(size: int, spec: AxisSpec) -> tuple[int, int, bool]:
    """(outer, inner, inner_is_sequence) of one axis; negative windows are size // -w."""
    kind, n = spec
    if kind == "window":
        w = size if n == -1 else (size // -n if n < 0 else n)
        if w < 1 or size % w != 0:
            raise ValueError(f"a window of {w} tokens does not divide an axis of {size} tokens")
        return size // w, w, True
    if kind == "stride":
        if size % n != 0:
            raise ValueError(f"a stride of {n} tokens does not divide an axis of {size} tokens")
        return size // n, n, False
    raise ValueError(f"unknown axis grouping {kind!r}")


def check_grouping(grid: Sequence[int], grouping: Grouping) -> None:
    """Raise ValueError when `grouping` cannot cut a `(T, H, W)` token grid."""
    for size, spec in zip(grid, grouping):
        _axis_split(size, spec)


def grouping_layout(grid: Sequence[int], grouping: Grouping, prefix: int = 0) -> dict[str, object]:
    """The `attention_layout` of the sequences `group_tokens` cuts (for `capture_attention`).

    A windowed axis gives sequences of `w` neighbouring tokens, a strided one of tokens `s`
    apart; axes of one token drop out.
    """
    axes, seq, tiled = [], [], []
    for i, (size, spec) in enumerate(zip(grid, grouping)):
        outer, inner, inner_seq = _axis_split(size, spec)
        length = inner if inner_seq else outer
        if length > 1:
            axes.append(i)
            seq.append(length)
            tiled.append(size if inner_seq else size // inner)  # strided: one step is `s` tokens
    return {
        "axes": tuple(axes), "query_grid": tuple(seq), "tiled_grid": tuple(tiled),
        "query_prefix": prefix, "key_prefix": prefix,
    }


def group_tokens(
    x: torch.Tensor, grid: Sequence[int], grouping: Grouping
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Cut patch tokens `(B, T*H*W, D)` into attention sequences `(B*G, L, D)`.

    Groups are batch-major (sequence `b * G + g` belongs to clip `b`).

    Returns:
        The sequences and the function putting sequences of the same shape back into
        `(B, T*H*W, D)` order.
    """
    b, _, d = x.shape
    shape: list[int] = []
    group_dims: list[int] = []
    seq_dims: list[int] = []
    for i, (size, spec) in enumerate(zip(grid, grouping)):
        outer, inner, inner_seq = _axis_split(size, spec)
        shape += [outer, inner]
        o, n = 1 + 2 * i, 2 + 2 * i
        group_dims.append(o if inner_seq else n)
        seq_dims.append(n if inner_seq else o)
    perm = [0, *group_dims, *seq_dims, 7]
    y = x.reshape(b, *shape, d).permute(perm)
    permuted_shape = y.shape
    g = 1
    for i in group_dims:
        g *= shape[i - 1]
    y = y.reshape(b * g, -1, d)
    inverse = [perm.index(i) for i in range(8)]

    def ungroup(z: torch.Tensor) -> torch.Tensor:
        return z.reshape(permuted_shape[:-1] + (z.shape[-1],)).permute(inverse).reshape(b, -1, z.shape[-1])

    return y, ungroup


class FactorisedSpaceTimeBlock(nn.Module):
    """Pre-norm block whose self-attention is a chain of grouped attentions.

    Every step but the last is `x + fc(DropPath(attn(norm(groups(x)))))` on the patch tokens,
    with its own `{name}_norm1`, `{name}_attn` and `{name}_fc` (TimeSformer's names: divided
    attention has a `temporal` step). The last step uses the image block's names (`norm1`,
    `attn`), so an image checkpoint fills it; the class token joins every group of the last
    step and its outputs are averaged over the groups. Then the MLP.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        steps: `(name, grouping)` of the steps before the last.
        final: Grouping of the last step.
        mlp_ratio: MLP hidden width relative to `dim`.
        qkv_bias: Bias of the q/k/v projections.
        qk_norm: Per-head query/key normalisation.
        proj_drop: Dropout after the attention and MLP projections.
        attn_drop: Dropout on attention weights.
        init_values: Unsupported here (LayerScale); kept for the `Block` signature.
        drop_path: Stochastic-depth probability.
        act_layer: MLP activation.
        norm_layer: Norm class.
        attn_layer: Attention class (as for `Block`).
        mlp_layer: MLP class.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        steps: Sequence[tuple[str, Grouping]] = (("temporal", GROUPINGS["time"]),),
        final: Grouping = GROUPINGS["space"],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        if init_values is not None:
            raise ValueError("FactorisedSpaceTimeBlock does not support LayerScale (init_values)")
        attn_kw = dict(
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
        )
        self.steps = [(name, grouping) for name, grouping in steps]
        self.final = final
        for name, _ in self.steps:
            setattr(self, f"{name}_norm1", norm_layer(dim))
            setattr(self, f"{name}_attn", attn_layer(dim, **attn_kw))
            setattr(self, f"{name}_fc", nn.Linear(dim, dim))
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, **attn_kw)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)

    def step_fcs(self) -> list[nn.Linear]:
        """Output projections of the steps before the last (zeroed: the block is an image block)."""
        return [getattr(self, f"{name}_fc") for name, _ in self.steps]

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Tokens `(B, 1 + T*H*W, D)` (class token first) on the patch grid `(T, H, W)`."""
        b = x.shape[0]
        cls, patches = x[:, :1], x[:, 1:]
        for name, grouping in self.steps:
            seq, ungroup = group_tokens(patches, grid, grouping)
            with attention_layout(**grouping_layout(grid, grouping)):
                y = getattr(self, f"{name}_attn")(getattr(self, f"{name}_norm1")(seq))
            patches = patches + getattr(self, f"{name}_fc")(self.drop_path(ungroup(y)))
        seq, ungroup = group_tokens(patches, grid, self.final)
        g = seq.shape[0] // b
        with attention_layout(**grouping_layout(grid, self.final, prefix=1)):
            y = self.attn(self.norm1(torch.cat([cls.repeat_interleave(g, dim=0), seq], dim=1)))
        cls_out = y[:, :1].reshape(b, g, 1, -1).mean(dim=1)
        res = torch.cat([cls_out, ungroup(y[:, 1:])], dim=1)
        x = torch.cat([cls, patches], dim=1) + self.drop_path(res)
        return x + self.drop_path(self.mlp(self.norm2(x)))
