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


def _bottleneck(cin: int, width: int = 64) -> int:
    """A stride-2 ResNet bottleneck with its 1x1 projection shortcut (convs without bias + BN)."""
    out = 4 * width
    return cin * width + 2 * width + 9 * width * width + 2 * width + width * out + 2 * out + cin * out + 2 * out


def _official_count(dim: int, depth: int, mlp_ratio: int, dr: tuple[int, int], classes: int = 1000) -> tuple[int, int]:
    """(trainable, cross-covariance head) parameters of the official So_vit_7/10/14, by hand."""
    hidden = mlp_ratio * dim
    stem = (3 * 64 * 9 + 64) + _bottleneck(64) + 2 * _bottleneck(256) + (256 * dim + dim)
    block = 2 * dim + dim * 3 * dim + (dim * dim + dim) + 2 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    # two 1x1 reductions (+ BN), the learned svPN weight, the classifiers of both representations
    head = sum(dim * r + 2 * r for r in dr) + dr[0] + (dr[0] * dr[1] * classes + classes) + (dim * classes + classes)
    return stem + dim + depth * block + 2 * dim + head, head


# (name, width, depth, MLP ratio, official reductions, cov_dim here)
SOVIT_VARIANTS = (
    ("so_vit_7", 256, 7, 2, (48, 24), 48),
    ("so_vit_10", 256, 10, 2, (48, 24), 48),
    ("so_vit_14", 384, 14, 3, (64, 48), 78),
)


def test_parameter_counts_are_the_official_configurations_but_the_head() -> None:
    # The hand count equals the official So_vit_7/10/14 (jiangtaoxie/So-ViT at the So-ViT
    # revision, src/so_vit.py) instantiated: 5,529,232 / 7,108,240 / 24,643,056 trainable
    # parameters (plus the frozen sin-cos table: 5,579,664 / 7,158,672 / 24,718,704 in all).
    official = [_official_count(w, d, r, dr) for _, w, d, r, dr, _ in SOVIT_VARIANTS]
    assert [n for n, _ in official] == [5_529_232, 7_108_240, 24_643_056]
    for (name, width, _, _, _, cov_dim), (total, cross_head) in zip(SOVIT_VARIANTS, official):
        with torch.device("meta"):
            m = medvit.create_model(name, num_classes=1000)
        # Only the second-order head differs (see the model's docstring): one reduction (+ BN)
        # and the upper triangle of its covariance instead of the released cross-covariance.
        ours_head = (width * cov_dim + 2 * cov_dim) + (cov_dim * (cov_dim + 1) // 2 * 1000 + 1000)
        ours_head += width * 1000 + 1000
        assert sum(p.numel() for p in m.parameters()) == total - cross_head + ours_head, name
        assert m.cov_pool.cov_dim == cov_dim and m.head_cov.in_features == cov_dim * (cov_dim + 1) // 2


def test_parameter_counts_match_the_released_checkpoints() -> None:
    # No parameter table of the paper was at hand: the released So-ViT-7/10/14 checkpoint files
    # (85.08 / 109.24 / 377.09 MiB, the So-ViT README) hold weights, EMA weights and two Adam
    # moments, 16 bytes a parameter: 5.58M / 7.16M / 24.71M, the official totals above to
    # 0.1%. Here the cross-covariance head is 24 / 9 features wider: within 1% of those.
    for name, released in (("so_vit_7", 5.576e6), ("so_vit_10", 7.159e6), ("so_vit_14", 24.71e6)):
        with torch.device("meta"):
            n = sum(p.numel() for p in medvit.create_model(name, num_classes=1000).parameters())
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
