"""So-ViT: covariance pooling and iSQRT normalisation, the summed heads, the conv stem.

timm has no So-ViT; the second-order head is checked against linear algebra.
"""

from __future__ import annotations

import pytest
import torch

import medvit
from medvit.layers.cov_pool import CovariancePool, covariance, sqrtm_newton_schulz, triu_vectorize
from medvit.layers.hybrid_embed import HybridEmbed

TINY = dict(embed_dim=32, depth=2, num_heads=2, token_dim=8, cov_dim=6, img_size=32, num_classes=5)


def sovit(**kw):
    return medvit.create_model("so_vit_7", **{**TINY, **kw}).eval()


def test_parameter_counts_match_the_released_models() -> None:
    # No parameter table of the paper was at hand: the references are the released
    # So-ViT-7/10/14 checkpoints, whose files (85.08 / 109.24 / 377.09 MiB holding
    # weights, EMA weights and two Adam moments, 16 bytes a parameter) give 5.58M /
    # 7.16M / 24.71M. Those include the frozen sin-cos table (a buffer here) and a
    # cross-covariance head 1152 / 3072 wide (1176 / 3081 here): within 1%.
    for name, released in (("so_vit_7", 5.576e6), ("so_vit_10", 7.159e6), ("so_vit_14", 24.71e6)):
        with torch.device("meta"):
            n = sum(p.numel() for p in medvit.create_model(name).parameters())
        assert abs(n - released) / released < 0.01, (name, n)
    with torch.device("meta"):
        m = medvit.create_model("so_vit_14")
    assert (m.embed_dim, len(m.blocks), m.cov_pool.cov_dim, m.head_cov.in_features) == (384, 14, 78, 3081)


@torch.no_grad()
def test_covariance_is_symmetric_psd_before_normalisation() -> None:
    torch.manual_seed(0)
    pool = CovariancePool(16, cov_dim=6).train()
    tokens = torch.randn(3, 20, 16)
    cov = pool.reduced_covariance(tokens)
    assert cov.shape == (3, 6, 6) and cov.dtype == torch.float32
    torch.testing.assert_close(cov, cov.transpose(1, 2))
    assert torch.linalg.eigvalsh(cov).min() > -1e-6
    x = torch.randn(2, 50, 4)
    ref = torch.stack([torch.cov(s.T, correction=0) for s in x])
    torch.testing.assert_close(covariance(x), ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_newton_schulz_square_root() -> None:
    torch.manual_seed(0)
    a = torch.randn(2, 6, 40, dtype=torch.float64)
    spd = a @ a.transpose(1, 2) / 40 + 0.1 * torch.eye(6, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(spd)
    exact = evecs @ torch.diag_embed(evals.sqrt()) @ evecs.transpose(1, 2)
    approx = sqrtm_newton_schulz(spd, num_iters=25)
    torch.testing.assert_close(approx, exact, atol=1e-6, rtol=0)
    torch.testing.assert_close(approx @ approx, spd, atol=1e-6, rtol=0)
    # few iterations (the model's 5) already give a symmetric approximation
    five = sqrtm_newton_schulz(spd, num_iters=5)
    torch.testing.assert_close(five, five.transpose(1, 2))
    tri = triu_vectorize(exact)
    assert tri.shape == (2, 21)
    torch.testing.assert_close(tri[:, :6], exact[:, 0])  # first row, diagonal included


@torch.no_grad()
def test_logits_are_the_sum_of_both_heads() -> None:
    m = sovit()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    cls_logits = m.head(feats[:, 0])
    cov_logits = m.head_cov(m.cov_pool(feats[:, 1:]))
    torch.testing.assert_close(m(x), cls_logits + cov_logits)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, m.head_hidden_size) == (2, 32 + 21)
    m.reset_classifier(0)
    torch.testing.assert_close(m(x), pre)
    assert m.num_features == 32 and m.head_cov is None
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.head_cov.out_features == 3
    first_order = sovit(cov_dim=None)
    assert first_order.cov_pool is None and first_order(x).shape == (2, 5)


def test_token_stem_and_interface() -> None:
    m = sovit()
    assert isinstance(m.patch_embed, HybridEmbed) and m.patch_embed.proj.kernel_size == (1, 1)
    assert m.patch_embed.backbone.reduction == 16 and m.grid_size == (2, 2)
    x = torch.randn(2, 3, 32, 32)
    final, feats = m.forward_intermediates(x)
    assert [f.shape for f in feats] == [(2, 32, 2, 2)] * 2
    torch.testing.assert_close(m.forward_head(final), m(x))
    assert sovit(global_pool="map")(x).shape == (2, 5)
    frozen = sovit(freeze_patch_embed=True).train()
    assert not any(p.requires_grad for p in frozen.patch_embed.proj.parameters())
    frozen(x).sum().backward()
    assert frozen.cov_pool.reduce.weight.grad is not None
    assert frozen.patch_embed.backbone.conv.weight.grad is not None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cov_dim"):
        sovit(cov_dim=1)
    with pytest.raises(ValueError, match="does not divide"):
        sovit(img_size=40)
    with pytest.raises(ValueError, match="patch_size"):
        sovit(patch_size=8)


def test_parameter_counts_equal_timm_where_timm_has_the_model() -> None:
    timm = pytest.importorskip("timm")
    for name in (n for n in medvit.list_models("so_vit_*") if n in timm.list_models()):
        with torch.device("meta"):
            ref = sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters())
            ours = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
        assert ours == ref, name
