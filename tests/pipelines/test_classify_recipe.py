"""Classification recipes: the preset tables, transforms, Mixup / CutMix, repeated augmentation, losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from medvit.pipelines.classify_recipe import (
    AUGREG_AUG,
    RECIPES,
    ClassifyRecipe,
    LevelRandAugment,
    MixCut,
    RepeatedAugmentationSampler,
    cutmix_box,
    eval_transform,
    get_classify_recipe,
    hard_distillation_loss,
    soft_target_cross_entropy,
    train_transform,
)
from medvit.pipelines.errors import MedvitError

# big_vision configs/vit_i1k.py: RANDAUG_DEF and MIXUP_DEF (Steiner et al., "How to train your ViT?")
AUGREG = {
    "none": (None, 0.0),
    "light1": ((2, 0), 0.0),
    "light2": ((2, 10), 0.2),
    "medium1": ((2, 15), 0.2),
    "medium2": ((2, 15), 0.5),
    "strong1": ((2, 20), 0.5),
    "strong2": ((2, 20), 0.8),
}


@pytest.mark.parametrize("aug", list(AUGREG))
@pytest.mark.parametrize("reg, rate", [("none", 0.0), ("reg", 0.1)])
def test_augreg_presets_match_big_vision(aug: str, reg: str, rate: float) -> None:
    r = RECIPES[f"augreg-{aug}-{reg}"]
    randaug, mixup = AUGREG[aug]
    assert (None if r.randaug_magnitude is None else (r.randaug_ops, r.randaug_magnitude)) == randaug
    assert r.mixup_alpha == mixup and r.cutmix_alpha == 0.0
    assert r.dropout == rate and r.drop_path_rate == rate
    assert r.model_kwargs() == (
        {"drop_path_rate": 0.1, "pos_drop_rate": 0.1, "proj_drop_rate": 0.1} if rate else {"drop_path_rate": 0.0}
    )
    # the rest is the baseline's: no DeiT extras
    assert (r.label_smoothing, r.random_erasing, r.repeated_aug) == (0.0, 0.0, 1)
    assert (r.lr, r.weight_decay, r.warmup_epochs) == (RECIPES["baseline"].lr, 0.05, 5)


def test_preset_names() -> None:
    assert set(RECIPES) == {"baseline", "deit"} | {f"augreg-{a}-{g}" for a in AUGREG for g in ("none", "reg")}
    assert set(AUGREG_AUG) == set(AUGREG)


def test_deit_recipe_is_table_9() -> None:
    r = RECIPES["deit"]
    assert r == ClassifyRecipe()
    assert (r.randaug_ops, r.randaug_magnitude) == (2, 9)
    assert (r.mixup_alpha, r.cutmix_alpha, r.mix_prob, r.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert (r.label_smoothing, r.random_erasing, r.repeated_aug) == (0.1, 0.25, 3)
    assert (r.drop_path_rate, r.dropout, r.optimizer, r.weight_decay) == (0.1, 0.0, "adamw", 0.05)
    assert (r.epochs, r.warmup_epochs, r.schedule, r.ema, r.grad_clip) == (300, 5, "cosine", False, None)
    assert r.scaled_lr(1024) == pytest.approx(1e-3)  # 5e-4 x 1024 / 512
    b = RECIPES["baseline"]
    assert b.randaug_magnitude is None and b.mixup_alpha == b.cutmix_alpha == b.label_smoothing == 0.0
    assert b.lr == r.lr and b.drop_path_rate == 0.0 and b.repeated_aug == 1


def test_get_classify_recipe_overrides_and_errors() -> None:
    assert get_classify_recipe("deit", epochs=30).epochs == 30
    with pytest.raises(MedvitError, match="unknown classification recipe 'augreg-heavy1-none'"):
        get_classify_recipe("augreg-heavy1-none")
    with pytest.raises(MedvitError, match="recipe deit: .*'epoch'"):
        get_classify_recipe("deit", epoch=3)
    with pytest.raises(MedvitError, match="recipe deit: optimizer must be one of"):
        get_classify_recipe("deit", optimizer="lamb")
    with pytest.raises(MedvitError, match="recipe deit: label_smoothing must be in"):
        get_classify_recipe("deit", label_smoothing=1.5)
    with pytest.raises(MedvitError, match="repeated_aug must be at least 1"):
        get_classify_recipe("deit", repeated_aug=0)


# -- transforms -------------------------------------------------------------------------
def test_level_randaugment_equals_torchvision_up_to_level_10() -> None:
    img = torch.rand(3, 24, 24)
    for seed in range(6):
        torch.manual_seed(seed)
        ours = LevelRandAugment(2, 9)(img)
        torch.manual_seed(seed)
        theirs = v2.RandAugment(2, magnitude=9, num_magnitude_bins=11)(img)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_level_randaugment_extends_geometric_ops_beyond_10() -> None:
    space = LevelRandAugment(2, 20)._AUGMENTATION_SPACE
    rotate = space["Rotate"][0](21, 32, 32)
    assert float(rotate[10]) == pytest.approx(30.0) and float(rotate[20]) == pytest.approx(60.0)  # TF: level/10*30
    assert float(space["ShearX"][0](21, 32, 32)[15]) == pytest.approx(0.45)
    brightness = space["Brightness"][0](21, 32, 32)
    assert float(brightness[20]) == pytest.approx(0.9)  # photometric ops stop at level 10
    assert int(space["Posterize"][0](21, 32, 32)[20]) == 4
    with pytest.raises(ValueError, match="non-negative"):
        LevelRandAugment(2, -1)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_train_transform(channels: int) -> None:
    torch.manual_seed(0)
    t = train_transform(RECIPES["deit"], "image", 16)
    outs = [t(torch.rand(channels, 40, 30)) for _ in range(4)]
    assert all(o.shape == (channels, 16, 16) and o.dtype == torch.float32 for o in outs)
    plain = train_transform(RECIPES["baseline"], "image", (16, 12))
    x = torch.rand(channels, 40, 30)
    out = plain(x)
    assert out.shape == (channels, 16, 12) and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    normed = train_transform(RECIPES["baseline"], "image", 8, mean=[0.5] * channels, std=[0.25] * channels)
    const = normed(torch.full((channels, 20, 20), 0.75))
    torch.testing.assert_close(const, torch.ones(channels, 8, 8))  # crop of a constant, then (0.75 - 0.5) / 0.25


def test_train_transform_leaves_labels_alone() -> None:
    # transforms take the sample only; the (image, label) pair passes through v2 untouched
    t = train_transform(RECIPES["deit"], "image", 8)
    label = torch.tensor(3)
    out, lab = v2.Compose(t.transforms)(torch.rand(3, 12, 12), label)
    assert lab is label and out.shape == (3, 8, 8)


def test_video_frames_get_the_same_random_draw() -> None:
    torch.manual_seed(1)
    recipe = get_classify_recipe("deit", random_erasing=1.0)
    t = train_transform(recipe, "video", 12)
    frame = torch.rand(3, 1, 20, 24)
    for _ in range(5):
        out = t(frame.expand(3, 4, 20, 24).clone())
        assert out.shape == (3, 4, 12, 12)
        for i in range(1, 4):
            torch.testing.assert_close(out[:, i], out[:, 0], atol=0, rtol=0)
    # different frames stay different (the clip is not collapsed to one frame)
    clip = torch.rand(3, 4, 20, 24)
    out = train_transform(RECIPES["baseline"], "video", 12)(clip)
    assert not torch.equal(out[:, 0], out[:, 1])


def test_volume_transforms() -> None:
    torch.manual_seed(0)
    vol = torch.rand(1, 20, 18, 16)
    out = train_transform(RECIPES["deit"], "volume", 8)(vol)
    assert type(out) is torch.Tensor and out.shape == (1, 8, 8, 8)
    ev = eval_transform(RECIPES["deit"], "volume", (8, 6, 4))(vol)
    assert ev.shape == (1, 8, 6, 4)
    # flips only on the recipe's axes (leave out left-right for lateralised classes)
    from monai.transforms import RandFlip

    t = train_transform(get_classify_recipe("deit", volume_flip_axes=(1, 2)), "volume", 4)
    assert [f.flipper.spatial_axis for f in t.transforms if isinstance(f, RandFlip)] == [1, 2]


def test_eval_transform_centre_crop() -> None:
    img = torch.zeros(1, 64, 64)
    img[:, 24:40, 24:40] = 1.0
    out = eval_transform(RECIPES["deit"], "image", 28)(img)  # resize to 32, centre crop 28
    assert out.shape == (1, 28, 28)
    assert float(out[0, 14, 14]) == pytest.approx(1.0) and float(out[0, 0, 0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="kind must be"):
        eval_transform(RECIPES["deit"], "audio", 8)
    with pytest.raises(ValueError, match="3 axes"):
        train_transform(RECIPES["deit"], "volume", (8, 8))


# -- Mixup / CutMix ---------------------------------------------------------------------
def _class_images(labels: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Each image constant, equal to its class index."""
    return labels.float().view(-1, 1, *[1] * len(spatial)).expand(-1, 1, *spatial).contiguous()


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mixcut_targets_follow_the_images(spatial: tuple[int, ...], mode: str) -> None:
    k, eps = 5, 0.1
    labels = torch.tensor([0, 3, 1, 4])
    x = _class_images(labels, spatial)
    alphas = dict(mixup_alpha=1.0, cutmix_alpha=0.0) if mode == "mixup" else dict(mixup_alpha=0.0, cutmix_alpha=1.0)
    mixer = MixCut(k, **alphas, label_smoothing=eps)
    seen_lams = set()
    for seed in range(8):
        torch.manual_seed(seed)
        mixed, targets = mixer(x, labels)
        got_mode, lam = mixer.last
        assert got_mode == mode
        seen_lams.add(round(lam, 4))
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        onehot = F.one_hot(labels, k).float()
        want = lam * onehot + (1 - lam) * onehot.roll(1, 0)
        torch.testing.assert_close(targets, want * (1 - eps) + eps / k)
        # the image is what the targets say: its mean is the target-weighted class index
        unsmoothed = (targets - eps / k) / (1 - eps)
        class_mean = unsmoothed @ torch.arange(k, dtype=torch.float32)
        torch.testing.assert_close(mixed.flatten(1).mean(1), class_mean, atol=1e-5, rtol=0)
        if mode == "cutmix":
            # the pasted box covers exactly 1 - lam of the image
            own = (mixed == x).flatten(1).float().mean(1)
            torch.testing.assert_close(own, torch.full((4,), lam), atol=1e-6, rtol=0)
    assert len(seen_lams) > 1  # lam is drawn, not fixed


def test_mixcut_switch_prob_and_prob() -> None:
    labels = torch.tensor([0, 1, 2, 3])
    x = _class_images(labels, (8, 8))
    torch.manual_seed(0)
    mixer = MixCut(4, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0)
    modes = [mixer(x, labels) and mixer.last[0] for _ in range(200)]
    assert 60 < modes.count("cutmix") < 140 and modes.count("cutmix") + modes.count("mixup") == 200
    off = MixCut(4, prob=0.0, label_smoothing=0.2)
    mixed, targets = off(x, labels)
    assert torch.equal(mixed, x) and off.last == ("none", 1.0)
    torch.testing.assert_close(targets, F.one_hot(labels, 4).float() * 0.8 + 0.05)
    with pytest.raises(ValueError, match="need x"):
        mixer(torch.zeros(4, 8, 8), labels)


def test_cutmix_box_volume_matches_lam() -> None:
    torch.manual_seed(0)
    for lam in (0.2, 0.5, 0.9):
        for _ in range(5):
            box, adjusted = cutmix_box((16, 16, 16), lam)
            inside = math.prod(s.stop - s.start for s in box)
            assert adjusted == pytest.approx(1 - inside / 16**3)
            assert all(0 <= s.start <= s.stop <= 16 for s in box)
    # unclipped, each side is (1 - lam)^(1/3) of the axis: 0.5 of 64 for lam = 7/8
    sides = [[s.stop - s.start for s in cutmix_box((64, 64, 64), 1 - 0.125)[0]] for _ in range(40)]
    assert max(max(s) for s in sides) == 32 and [32, 32, 32] in sides


# -- repeated augmentation --------------------------------------------------------------
@pytest.mark.parametrize("n, repeats, replicas", [(10, 3, 1), (10, 3, 2), (7, 3, 4), (12, 2, 3)])
def test_repeated_augmentation_sampler(n: int, repeats: int, replicas: int) -> None:
    samplers = [RepeatedAugmentationSampler(n, repeats, replicas, r, seed=5) for r in range(replicas)]
    full = samplers[0].full_indices()
    total = math.ceil(n * repeats / replicas) * replicas
    assert len(full) == total
    counts = torch.bincount(torch.tensor(full[: n * repeats]), minlength=n)
    assert counts.tolist() == [repeats] * n  # before the padding every index appears `repeats` times
    per_rank = [list(s) for s in samplers]
    assert all(len(p) == len(s) == math.ceil(n / replicas) for p, s in zip(per_rank, samplers, strict=True))
    for r, p in enumerate(per_rank):  # rank r owns positions r, r + replicas, ... of the full list
        assert p == full[r::replicas][: len(p)]
    # determinism: same seed and epoch, same list; another epoch, another order
    again = RepeatedAugmentationSampler(n, repeats, replicas, 0, seed=5)
    assert list(again) == per_rank[0]
    again.set_epoch(1)
    assert again.full_indices() != full
    assert RepeatedAugmentationSampler(n, repeats, replicas, 0, seed=6).full_indices() != full


def test_repeated_augmentation_copies_are_adjacent_and_errors() -> None:
    s = RepeatedAugmentationSampler(6, 3, shuffle=False)
    assert s.full_indices() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert list(s) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="rank"):
        RepeatedAugmentationSampler(6, 3, num_replicas=2, rank=2)


# -- losses -----------------------------------------------------------------------------
CLS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 1.2]])
DIST = torch.tensor([[0.2, 1.5, -0.3], [1.0, -0.5, 0.4]])
LABELS = torch.tensor([0, 2])


def test_soft_target_cross_entropy() -> None:
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.4, 0.6]])
    want = -(soft * CLS.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(soft_target_cross_entropy(CLS, soft), want)
    onehot = F.one_hot(LABELS, 3).float()
    torch.testing.assert_close(soft_target_cross_entropy(CLS, onehot), F.cross_entropy(CLS, LABELS))


def test_hard_distillation_uses_the_teachers_argmax() -> None:
    teacher = torch.tensor([[0.0, 3.0, 1.0], [5.0, 1.0, 2.0]])  # argmax 1, 0
    loss = hard_distillation_loss((CLS, DIST), LABELS, teacher)
    want = 0.5 * F.cross_entropy(CLS, LABELS) + 0.5 * F.cross_entropy(DIST, torch.tensor([1, 0]))
    torch.testing.assert_close(loss, want)
    same_argmax = torch.tensor([[-9.0, 9.0, 0.0], [1.0, 0.5, 0.9]])
    torch.testing.assert_close(hard_distillation_loss((CLS, DIST), LABELS, same_argmax), loss)
    other_argmax = torch.tensor([[0.0, 3.0, 4.0], [5.0, 1.0, 2.0]])
    assert not torch.allclose(hard_distillation_loss((CLS, DIST), LABELS, other_argmax), loss)
    # one head: both terms on it
    one = hard_distillation_loss(CLS, LABELS, teacher)
    torch.testing.assert_close(
        one, 0.5 * F.cross_entropy(CLS, LABELS) + 0.5 * F.cross_entropy(CLS, torch.tensor([1, 0]))
    )
    # soft targets from MixCut for the class term
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.4, 0.6]])
    mixed = hard_distillation_loss((CLS, DIST), soft, teacher)
    torch.testing.assert_close(
        mixed, 0.5 * soft_target_cross_entropy(CLS, soft) + 0.5 * F.cross_entropy(DIST, torch.tensor([1, 0]))
    )


def test_hard_distillation_with_a_distilled_deit() -> None:
    import medvit

    torch.manual_seed(0)
    model = medvit.create_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=16, depth=1, num_classes=3
    ).train()
    model.set_distilled_training()
    x = torch.rand(2, 3, 32, 32)
    mixed, targets = MixCut(3, label_smoothing=0.1)(x, torch.tensor([0, 2]))
    outputs = model(mixed)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    loss = hard_distillation_loss(outputs, targets, torch.randn(2, 3))
    loss.backward()
    assert model.head_dist.weight.grad is not None and model.head.weight.grad is not None
