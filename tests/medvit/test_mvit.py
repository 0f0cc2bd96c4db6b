"""MViT v1: configuration (pooling per block, token counts), a hand-written attention
reference, parameter counts against the paper, the common interface, 3D volumes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import require
from tiny_configs import tiny_overrides

import medvit
from medvit.layers.pooling_attention_v1 import PoolingAttentionV1


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _tiny(**kw):
    kw = {"embed_dim": 16, "depth": (1, 1, 2, 1), "img_size": 64, "num_classes": 5, **kw}
    return medvit.create_model("mvit_b_16", **kw)


def test_parameter_counts_match_the_paper() -> None:
    with torch.device("meta"):
        b16 = medvit.create_model("mvit_b_16")
        b24 = medvit.create_model("mvit_b_24")
    # the paper's ImageNet table: MViT-B-16 37.0M
    assert round(_count(b16) / 1e6, 1) == 37.0
    # 24 blocks at B-16's widths (2-3-16-3); the paper's 72.9M figure is the wider B-24
    assert round(_count(b24) / 1e6, 1) == 53.5


def test_b16_pooling_configuration() -> None:
    with torch.device("meta"):
        m = medvit.create_model("mvit_b_16")
    assert len(m.blocks) == 16 and m.stage_ends == [0, 2, 13, 15]
    assert m.stage_channels == [192, 384, 768, 768] and m.stage_strides == [4, 8, 16, 32]
    heads = [b.attn.num_heads for b in m.blocks]
    assert heads == [1] + [2] * 2 + [4] * 11 + [8] * 2
    widths = [(b.mlp.fc1.in_features, b.mlp.fc2.out_features) for b in m.blocks]
    assert widths[0] == (96, 192) and widths[2] == (192, 384) and widths[13] == (384, 768)
    assert widths[1] == (192, 192) and widths[15] == (768, 768)
    kv_strides = [b.attn.pool_k.stride for b in m.blocks]
    assert kv_strides == [(4, 4)] + [(2, 2)] * 2 + [(1, 1)] * 13
    for i, blk in enumerate(m.blocks):
        attn = blk.attn
        assert attn.pool_k.kernel_size == attn.pool_v.kernel_size == (3, 3)
        assert attn.pool_k.groups == attn.head_dim and attn.norm_k.normalized_shape == (attn.head_dim,)
        assert attn.rel_pos_h is None and not attn.residual_pooling
        if i in (1, 3, 14):  # first block of stages 2-4: query pooling by 2
            assert attn.pool_q.kernel_size == (3, 3) and attn.pool_q.stride == (2, 2)
            assert blk.shortcut_pool_attn.kernel_size == [3, 3] and blk.shortcut_pool_attn.stride == (2, 2)
        else:
            assert attn.pool_q is None and attn.norm_q is None and blk.shortcut_pool_attn is None


@pytest.fixture(scope="module")
def b16_32px() -> torch.nn.Module:
    """Full-size MViT-B-16 on a 32-pixel input, built once (building it dominates the time)."""
    torch.manual_seed(0)
    return medvit.create_model("mvit_b_16", img_size=32, num_classes=5).eval()


@torch.no_grad()
def test_pooled_token_counts_per_block(b16_32px: torch.nn.Module) -> None:
    outs, keys, hooks = [], [], []
    for blk in b16_32px.blocks:
        hooks.append(blk.register_forward_hook(lambda mod, inp, out: outs.append(out[0].shape[1])))
        hooks.append(blk.attn.pool_k.register_forward_hook(
            lambda mod, inp, out: keys.append(math.prod(out.shape[2:]))))
    try:
        b16_32px(torch.randn(1, 3, 32, 32))
    finally:
        for h in hooks:
            h.remove()
    grid = [8] + [4] * 2 + [2] * 11 + [1] * 2
    assert outs == [g * g + 1 for g in grid]  # + the class token
    # keys/values sit on the stride-16 grid (2x2), but a stage's first block pools its
    # (finer) input by the adaptive stride, as the reference does; last stage 1x1
    assert keys == [4, 16, 4, 16] + [4] * 11 + [1]


@torch.no_grad()
@pytest.mark.parametrize("has_cls", [True, False])
def test_attention_matches_hand_written_reference(has_cls: bool) -> None:
    torch.manual_seed(0)
    dim, heads, size = 8, 2, (6, 6)
    attn = PoolingAttentionV1(2, dim, dim, num_heads=heads, kernel_q=(3, 3), kernel_kv=(3, 3),
                              stride_q=(2, 2), stride_kv=(3, 3), has_cls_token=has_cls).eval()
    for p in attn.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, int(has_cls) + 36, dim)
    out, q_size = attn(x, size)

    hd = dim // heads
    q, k, v = attn.qkv(x).reshape(2, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)

    def pool(t, conv, norm):
        cls, t = (t[:, :, :1], t[:, :, 1:]) if has_cls else (t[:, :, :0], t)
        m = t.reshape(2 * heads, *size, hd).permute(0, 3, 1, 2)
        m = F.conv2d(m, conv.weight, stride=conv.stride, padding=1, groups=hd)
        t = torch.cat((cls, m.flatten(2).transpose(1, 2).reshape(2, heads, -1, hd)), dim=2)
        return F.layer_norm(t, (hd,), norm.weight, norm.bias, norm.eps), list(m.shape[2:])

    q, qs = pool(q, attn.pool_q, attn.norm_q)
    k, ks = pool(k, attn.pool_k, attn.norm_k)
    v, _ = pool(v, attn.pool_v, attn.norm_v)
    ref = (torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1) @ v).transpose(1, 2).reshape(2, -1, dim)
    torch.testing.assert_close(out, attn.proj(ref), atol=1e-5, rtol=0)
    assert q_size == qs == [3, 3] and ks == [2, 2]
    assert out.shape[1] == int(has_cls) + 9


@torch.no_grad()
def test_class_token_drives_the_token_head() -> None:
    m = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + 2 * 2, m.num_features)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), feats[:, 0])
    before = m(x)
    m.cls_token.add_(torch.randn_like(m.cls_token))  # not a constant: LayerNorm removes it
    assert not torch.allclose(m(x), before)
    no_cls = _tiny(class_token=False, global_pool="avg").eval()
    assert no_cls.cls_token is None and no_cls.forward_features(x).shape == (2, 4, no_cls.num_features)
    assert no_cls(x).shape == (2, 5)


@torch.no_grad()
def test_forward_intermediates_strides_4_8_16_32() -> None:
    m = _tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    final, feats = m.forward_intermediates(x)
    assert [f.shape for f in feats] == [
        (2, c, 64 // s, 64 // s) for c, s in zip(m.stage_channels, m.stage_strides)
    ]
    assert m.stage_channels == [32, 64, 128, 128] and m.stage_strides == [4, 8, 16, 32]
    torch.testing.assert_close(final, m.forward_features(x))
    nlc = m.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(nlc[0], final[:, 1:])
    early = m.forward_intermediates(x, indices=2, intermediates_only=True, stop_early=True)
    torch.testing.assert_close(early[0], feats[2])
    with pytest.raises(ValueError, match="out of range"):
        m.forward_intermediates(x, indices=[4])


def test_3d_variant_multiscale_features() -> None:
    m = medvit.create_model("mvit_b_16_3d", **tiny_overrides("mvit_b_16_3d"))
    assert m.spatial_dims == 3 and m.img_size == (32, 32, 32)
    assert m.blocks[1].attn.pool_q.kernel_size == (3, 3, 3) and m.blocks[1].attn.pool_q.stride == (2, 2, 2)
    x = torch.randn(1, 1, 32, 32, 32)
    feats = m.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape[2:]) for f in feats] == [(8,) * 3, (4,) * 3, (2,) * 3, (1,) * 3]
    assert [f.shape[1] for f in feats] == m.stage_channels
    out = m(x)
    assert out.shape == (1, 10)
    with torch.device("meta"):
        full = medvit.create_model("mvit_b_16_3d")
    assert full.img_size == (96, 96, 96) and full.stage_strides == [4, 8, 16, 32]


def test_max_pooling_mode_has_no_pool_norms() -> None:
    m = _tiny(mode="max")
    assert isinstance(m.blocks[1].attn.pool_q, torch.nn.MaxPool2d) and m.blocks[1].attn.norm_q is None
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert _count(m) < _count(_tiny())


def test_reset_classifier_and_pooled_features() -> None:
    m = _tiny()
    m.reset_classifier(7, global_pool="avg")
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 7) and m.global_pool == "avg"
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, m.num_features)
    assert _tiny(num_classes=0)(torch.randn(1, 3, 64, 64)).shape == (1, 128)
    with pytest.raises(ValueError, match="global_pool"):
        m.reset_classifier(3, global_pool="max")


def test_freeze_patch_embed() -> None:
    m = _tiny(freeze_patch_embed=True)
    assert not any(p.requires_grad for p in m.patch_embed.parameters())
    assert all(p.requires_grad for n, p in m.named_parameters() if not n.startswith("patch_embed"))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        medvit.create_model("mvit_b_16", img_size=100)
    with pytest.raises(ValueError, match="mode"):
        _tiny(mode="lsh")
    with pytest.raises(ValueError, match="class_token"):
        _tiny(class_token=False)
    with pytest.raises(ValueError, match="differs from img_size"):
        _tiny()(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="needs a pooling kernel"):
        PoolingAttentionV1(2, 8, 8, stride_q=(2, 2))
    with pytest.raises(ValueError, match="3 entries"):
        PoolingAttentionV1(3, 8, 8, kernel_kv=(3, 3))


def _from_torchvision(ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Map torchvision's (independent) MViT v1 weights onto ours; test-only, since the video
    family that would own a torchvision converter comes later."""
    out = {}
    for k, v in ref.state_dict().items():
        if k.startswith("pos_encoding."):
            continue
        k = k.replace("conv_proj.", "patch_embed.proj.").replace("attn.project.0.", "attn.proj.")
        k = k.replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
        k = k.replace(".project.", ".shortcut_proj_mlp.")
        k = k.replace("head.1.", "head.")
        for t in "qkv":
            k = k.replace(f"attn.pool_{t}.pool.", f"attn.pool_{t}.")
            k = k.replace(f"attn.pool_{t}.norm_act.0.", f"attn.norm_{t}.")
        out[k] = v
    pe = ref.pos_encoding
    grid = (pe.temporal_pos[:, None] + pe.spatial_pos[None]).flatten(0, 1)
    out["pos_embed"] = torch.cat((pe.class_pos[None], grid))[None]
    out["cls_token"] = pe.class_token[None, None]
    return out


def _tv_rows(full: bool, kq: list[int]) -> list[tuple]:
    """torchvision block settings (heads, in, out, kernel_q, stride_q, stride_kv), written out."""
    if not full:  # embed 16, stages 1-1-2-1
        return [
            (1, 16, 32, [], [], [1, 4, 4]),
            (2, 32, 64, kq, [1, 2, 2], [1, 2, 2]),
            (4, 64, 64, kq, [1, 2, 2], [1, 1, 1]),
            (4, 64, 128, [], [], [1, 1, 1]),
            (8, 128, 128, kq, [1, 2, 2], [1, 1, 1]),
        ]
    # MViT-B-16: embed 96, stages 1-2-11-2 (torchvision's mvit_v1_b widths and heads)
    heads = [1] + [2] * 2 + [4] * 11 + [8] * 2
    dims_in = [96] + [192] * 2 + [384] * 11 + [768] * 2
    dims_out = [192, 192, 384] + [384] * 10 + [768] * 3
    starts = {1: [1, 2, 2], 3: [1, 1, 1], 14: [1, 1, 1]}
    kv = [[1, 4, 4]] + [[1, 2, 2]] * 2 + [[1, 1, 1]] * 13
    return [(h, i, o, kq if b in starts else [], [1, 2, 2] if b in starts else [], kv[b])
            for b, (h, i, o) in enumerate(zip(heads, dims_in, dims_out))]


@torch.no_grad()
@pytest.mark.parametrize("spatial_dims,full", [(2, False), (3, False), (2, True)])
def test_parity_with_torchvision_mvit_v1(spatial_dims: int, full: bool, b16_32px: torch.nn.Module) -> None:
    tv = require("torchvision.models.video.mvit")
    torch.manual_seed(0)
    # images are torchvision's space-time model on one frame with 1 x k x k kernels
    t_k, frames = (3, 8) if spatial_dims == 3 else (1, 1)
    kq = [t_k, 3, 3]
    cfg = [tv.MSBlockConfig(h, i, o, q, kq, sq, s) for h, i, o, q, sq, s in _tv_rows(full, kq)]
    patch = dict(patch_embed_kernel=(t_k, 7, 7), patch_embed_stride=(2 if t_k == 3 else 1, 4, 4),
                 patch_embed_padding=(t_k // 2, 3, 3))
    ref = tv.MViT((32, 32), frames, cfg, residual_pool=False, residual_with_cls_embed=False,
                  rel_pos_embed=False, proj_after_attn=False, num_classes=5, **patch)
    for p in ref.parameters():
        p.add_(torch.randn_like(p) * 0.02)
    ref.eval()
    n = spatial_dims
    size = ((frames,) if n == 3 else ()) + (32, 32)
    small = {} if full else dict(embed_dim=16, depth=(1, 1, 2, 1))
    ours = b16_32px if full else medvit.create_model(
        "mvit_b_16_3d" if n == 3 else "mvit_b_16", img_size=size, in_chans=3, num_classes=5,
        patch_size=patch["patch_embed_kernel"][-n:], patch_stride=patch["patch_embed_stride"][-n:],
        patch_padding=patch["patch_embed_padding"][-n:], stride_q=(1, 2, 2)[-n:],
        stride_kv_adaptive=(1, 4, 4)[-n:], **small,
    )
    state = _from_torchvision(ref)
    if n == 2:  # drop the unit time axis of the 3D convs
        state = {k: v.squeeze(2) if v.ndim == 5 else v for k, v in state.items()}
    ours.load_state_dict(state, strict=True)
    ours.eval()
    x = torch.randn(2, 3, *size)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-4, rtol=0)
    if full:  # the registered configuration is the one compared, not one the test assembled
        assert (ours.patch_embed.proj.kernel_size, ours.patch_embed.proj.stride) == ((7, 7), (4, 4))
