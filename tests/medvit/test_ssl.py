"""Self-supervised methods (medvit.ssl) against hand computations on small tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import medvit
from medvit.ssl import DINO, DINOHead, DINOLoss, EncoderFeatures, MoCoV3, SiT, contrastive_loss, cosine_momentum
from medvit.ssl.sit import ReconstructionDecoder, corrupt_patches, reconstruction_loss, rotate_batch

VIT = dict(img_size=16, patch_size=8, in_chans=1, num_classes=0, embed_dim=16, depth=1, num_heads=2, spatial_dims=3)


def vit(**kw) -> nn.Module:
    return medvit.create_model("vit_tiny_patch16_96_3d", **{**VIT, **kw})


def views(n: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, size, size, size), torch.randn(n, 1, size, size, size)


def hand_ctr(q: torch.Tensor, k: torch.Tensor, t: float) -> float:
    """CE of q.k^T / T against the diagonal, by loops, times 2T."""
    def unit(rows: list[list[float]]) -> list[list[float]]:
        return [[v / math.sqrt(sum(a * a for a in r)) for v in r] for r in rows]

    q, k = unit(q.tolist()), unit(k.tolist())
    total = 0.0
    for i, qi in enumerate(q):
        logits = [sum(a * b for a, b in zip(qi, kj)) / t for kj in k]
        total += math.log(sum(math.exp(v) for v in logits)) - logits[i]
    return total / len(q) * 2 * t


def test_moco_contrastive_loss_equals_hand_computation() -> None:
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    assert float(contrastive_loss(q, k, 0.2)) == pytest.approx(hand_ctr(q, k, 0.2), rel=1e-9)
    assert float(contrastive_loss(q, q, 1.0)) < float(contrastive_loss(q, -q, 1.0))


def test_moco_forward_is_the_symmetric_loss_of_its_branches() -> None:
    model = MoCoV3(vit(), dim=8, mlp_dim=16).double()
    x1, x2 = (v.double() for v in views())
    loss = model(x1, x2)
    x = torch.cat([x1, x2])
    q = model.predictor(model.projector(model.base(x)[0]))
    k = model.momentum_projector(model.momentum_base(x)[0])
    expected = hand_ctr(q[:2], k[2:], 0.2) + hand_ctr(q[2:], k[:2], 0.2)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_moco_momentum_update_is_m_old_plus_one_minus_m_new() -> None:
    model = MoCoV3(vit(), dim=8, mlp_dim=16)
    with torch.no_grad():
        for p in model.base_parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in model.momentum_parameters()]
    new = [p.clone() for p in model.base_parameters()]
    model.update_momentum(0.9)
    for o, n, m in zip(old, new, model.momentum_parameters(), strict=True):
        assert torch.allclose(m, 0.9 * o + 0.1 * n, atol=1e-6)
    assert not any(p.requires_grad for p in model.momentum_parameters())


def test_moco_freezes_the_random_patch_projection_of_a_vit() -> None:
    model = MoCoV3(vit(), dim=8, mlp_dim=16)
    patch = model.encoder.patch_embed.proj.weight
    assert not patch.requires_grad and model.hyper_parameters()["freeze_patch_embed"]
    before = patch.clone()
    block = model.encoder.blocks[0].mlp.fc1.weight
    block_before = block.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(*views(), m=0.99).backward()
    opt.step()
    assert patch.grad is None and torch.equal(patch, before)
    assert not torch.equal(block, block_before)
    assert MoCoV3(vit(), dim=8, mlp_dim=16, freeze_patch_embed=False).encoder.patch_embed.proj.weight.requires_grad


def test_dino_centre_update_and_teacher_ema_by_hand() -> None:
    loss = DINOLoss(out_dim=3, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
    t = torch.tensor([[0.0, 1.0, 2.0], [4.0, 1.0, 0.0]])
    loss.update_center(t)
    assert torch.allclose(loss.center, torch.tensor([[0.9 + 0.2, 1.8 + 0.1, 2.7 + 0.1]]))

    model = DINO(vit(), out_dim=8, hidden_dim=16, bottleneck_dim=4)
    with torch.no_grad():
        for p in model.student_parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in model.teacher_parameters()]
    new = [p.clone() for p in model.student_parameters()]
    model.update_teacher(0.996)
    for o, n, p in zip(old, new, model.teacher_parameters(), strict=True):
        assert torch.allclose(p, 0.996 * o + 0.004 * n, atol=1e-6)


def hand_dino(students: list[list[list[float]]], teachers: list[list[list[float]]], center: list[float],
              ts: float = 0.1, tt: float = 0.04) -> float:  # fmt: skip
    def softmax(v: list[float]) -> list[float]:
        e = [math.exp(a - max(v)) for a in v]
        return [a / sum(e) for a in e]

    total, terms = 0.0, 0
    for i, t in enumerate(teachers):
        for v, s in enumerate(students):
            if v == i:
                continue
            per = []
            for tb, sb in zip(t, s):
                q = softmax([(a - c) / tt for a, c in zip(tb, center)])
                logp = [math.log(p) for p in softmax([a / ts for a in sb])]
                per.append(-sum(a * b for a, b in zip(q, logp)))
            total += sum(per) / len(per)
            terms += 1
    return total / terms


@pytest.mark.parametrize("local", [0, 1])
def test_dino_loss_equals_hand_computation(local: int) -> None:
    torch.manual_seed(1)
    s = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2 + local)]
    t = [torch.randn(2, 3, dtype=torch.float64) for _ in range(2)]
    fn = DINOLoss(out_dim=3).double()
    fn.center.copy_(torch.tensor([[0.1, -0.2, 0.3]]))
    expected = hand_dino([x.tolist() for x in s], [x.tolist() for x in t], [0.1, -0.2, 0.3])
    assert float(fn(s, t)) == pytest.approx(expected, rel=1e-9)
    # then the centre moved towards the teacher outputs' mean
    mean = torch.cat(t).mean(0, keepdim=True)
    assert torch.allclose(fn.center, 0.9 * torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64) + 0.1 * mean)


def test_dino_head_last_layer_has_unit_rows_and_a_frozen_norm() -> None:
    head = DINOHead(16, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_dino_multi_crop_trains_every_student_parameter() -> None:
    model = DINO(vit(dynamic_img_size=True), out_dim=8, hidden_dim=16, bottleneck_dim=4)
    x1, x2 = views()
    loss = model([x1, x2], [torch.randn(2, 1, 8, 8, 8)])
    loss.backward()
    trained = [n for n, p in model.student.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.loss_fn.last_entropy <= math.log(8) + 1e-6


def test_sit_rotations_match_their_labels() -> None:
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 1, 2, 4, 4)
    k = torch.tensor([1, 2])
    r = rotate_batch(x, k)
    assert torch.equal(r[0], torch.rot90(x[0], 1, dims=(-2, -1)))
    assert torch.equal(r[1], x[1].flip(-1).flip(-2))  # 180 degrees
    assert torch.equal(rotate_batch(r, 4 - k), x)  # back to the start
    assert torch.equal(r[0, :, 1].sum(), x[0, :, 1].sum())  # a slice along the first axis stays itself
    model = SiT(vit(), in_chans=1, stride=(8, 8, 8), dim=8, mlp_dim=16)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 1, 16, 16, 16)
    labels, target, _, _ = model.prepare(xs, g)
    for i in range(4):
        assert torch.equal(target[i], torch.rot90(xs[i], int(labels[i]), dims=(-2, -1)))
    with pytest.raises(ValueError, match="equal sizes"):
        rotate_batch(torch.zeros(1, 1, 4, 4, 6), torch.tensor([1]))


def test_sit_corruption_is_patchwise_and_reconstruction_counts_only_corrupted_patches() -> None:
    x = torch.rand(2, 1, 16, 16, 16) + 1.0  # nothing is zero before corruption
    out, mask = corrupt_patches(x, (8, 8, 8), 0.5, torch.Generator().manual_seed(0))
    cells = mask.view(2, 1, 2, 8, 2, 8, 2, 8)
    assert torch.equal(cells.amin((3, 5, 7)), cells.amax((3, 5, 7)))  # whole patches
    assert mask.view(2, -1).float().mean(1).tolist() == [0.5, 0.5]
    assert torch.equal(out[~mask], x[~mask]) and not torch.equal(out[mask], x[mask])
    pred = torch.where(mask, x, torch.full_like(x, 100.0))  # right on corrupted, wrong elsewhere
    assert float(reconstruction_loss(pred, x, mask)) == 0.0
    assert float(reconstruction_loss(torch.where(mask, x + 1, x), x, mask)) == pytest.approx(1.0)


def test_reconstruction_decoder_puts_channels_at_their_patch_offsets() -> None:
    dec = ReconstructionDecoder(3, 8, 1, (2, 2, 2))
    dec.net = nn.Identity()
    fmap = torch.arange(8.0).view(1, 8, 1, 1, 1).expand(1, 8, 3, 1, 2)
    out = dec(fmap)
    assert out.shape == (1, 1, 6, 2, 4)
    for a in range(2):
        for b in range(2):
            for c in range(2):
                assert torch.all(out[0, 0, a::2, b::2, c::2] == a * 4 + b * 2 + c)


def test_sit_loss_weights_and_gradients() -> None:
    model = SiT(vit(), in_chans=1, stride=(8, 8, 8), weights=(1.0, 0.0, 0.0), dim=8, mlp_dim=16)
    loss = model(*views(), generator=torch.Generator().manual_seed(0))
    assert float(loss.detach()) == pytest.approx(model.last_losses["rotation"], rel=1e-6)
    loss.backward()
    assert model.rotation_head.weight.grad.abs().sum() > 0
    assert not model.decoder.net[0].weight.grad.any()  # a zero weight: no gradient from reconstruction


def test_encoder_features_pool_as_the_backbone_or_average_the_map() -> None:
    x = torch.randn(2, 1, 16, 16, 16)
    pooled_vit = vit(global_pool="token")
    pooled, fmap = EncoderFeatures(pooled_vit)(x)
    assert torch.allclose(pooled, pooled_vit.forward_head(pooled_vit.forward_features(x), pre_logits=True))
    assert fmap.shape == (2, 16, 2, 2, 2)
    plain = vit(global_pool="", class_token=False)
    pooled, fmap = EncoderFeatures(plain)(x)
    assert torch.allclose(pooled, plain.forward_features(x).mean(1), atol=1e-6)


def test_cosine_momentum_rises_from_base_to_one() -> None:
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
