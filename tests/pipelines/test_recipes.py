"""Training recipes: registry, mirroring rule, schedules, augmentation alignment, CT fingerprint
normalisation (training and inference sides agree)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from medvit.pipelines.augment import train_transforms
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.geometry import model_grid, resample_scan
from medvit.pipelines.intensity import scale_intensity
from medvit.pipelines.io import Scan, read_scan
from medvit.pipelines.preprocessing import Preprocessing
from medvit.pipelines.recipes import (
    RECIPES,
    get_recipe,
    is_lateralised,
    left_right_axis,
    lr_lambda,
    mirror_axes,
    recipe_names,
    schedule_factor,
)
from medvit.pipelines.transforms import preprocess_transforms

NO_INTENSITY = dict(
    noise_prob=0.0, smooth_prob=0.0, brightness_prob=0.0, shift_prob=0.0, contrast_prob=0.0, lowres_prob=0.0,
    gamma_prob=0.0, gamma_inverted_prob=0.0,
)


def test_recipes_by_name() -> None:
    assert get_recipe("default") is get_recipe("strong") is RECIPES["strong"]
    assert get_recipe("light").sampler == "posneg" and get_recipe("light").mirror == "all"
    assert get_recipe("strong-poly").schedule == "poly"
    assert recipe_names()[0] == "default" and set(recipe_names()[1:]) == set(RECIPES)
    with pytest.raises(MedvitError, match=r"unknown training recipe 'nnunet' \(known: default, strong"):
        get_recipe("nnunet")
    with pytest.raises(MedvitError, match="sampler"):
        dataclasses.replace(get_recipe("strong"), sampler="uniform")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("kidney_left", True), ("kidney_right", True), ("LeftLung", True), ("adrenal_gland_l", True),
        ("Kidney R", True), ("rib_right_4", True), ("liver", False), ("spleen", False), ("vertebrae_L1", False),
        ("colon", False), ("aorta", False),
    ],
)
def test_lateralised_names(name, expected) -> None:
    assert is_lateralised(name) is expected


def test_mirror_axes_follow_the_left_right_rule() -> None:
    strong, light = get_recipe("strong"), get_recipe("light")
    assert mirror_axes(strong, ["liver", "kidney_left"]) == [1, 2]
    assert mirror_axes(strong, ["liver", "spleen"]) == [0, 1, 2]
    assert mirror_axes(strong, ["kidney_l"], orientation="PLS") == [0, 2]
    assert mirror_axes(light, ["kidney_left"]) == [0, 1, 2]  # the earlier behaviour, for comparison
    assert left_right_axis("SAR") == 2
    with pytest.raises(MedvitError, match="left-right"):
        left_right_axis("PSA")


def test_schedules() -> None:
    assert schedule_factor("cosine", 0, 100, 10) == pytest.approx(0.1)
    assert schedule_factor("poly", 9, 100, 10) == pytest.approx(1.0)
    assert schedule_factor("poly", 55, 100, 10) == pytest.approx(0.5**0.9)
    assert schedule_factor("cosine", 55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule_factor("poly", 100, 100, 10) == pytest.approx(0.0)
    poly = [schedule_factor("poly", s, 100, 10) for s in range(10, 100)]
    assert all(a > b for a, b in zip(poly, poly[1:]))
    with pytest.raises(MedvitError, match="schedule"):
        lr_lambda("step", 100, 10)


def _blobs(shape=(48, 40, 24)) -> torch.Tensor:
    lab = torch.zeros(1, *shape)
    lab[0, 4:18, 6:30, 3:20] = 1
    lab[0, 24:34, 10:22, 6:14] = 2
    lab[0, 36:44, 20:34, 10:22] = 3
    return lab


def _interior(label: np.ndarray, size: int = 5) -> np.ndarray:
    """Voxels whose neighbourhood (`size` voxels wide; zooming out by up to 1.4 spreads a
    bilinear sample's support) holds one class: away from boundaries and the crop's border."""
    lo = ndimage.minimum_filter(label, size=size, mode="constant", cval=-1)
    return ndimage.maximum_filter(label, size=size, mode="constant", cval=-1) == lo


@pytest.mark.parametrize("slice_axis", [None, 2])
def test_augmentation_keeps_image_and_label_aligned(slice_axis) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    recipe = dataclasses.replace(get_recipe("strong"), affine_prob=1.0, **NO_INTENSITY)
    patch = (32, 32, 16) if slice_axis is None else (32, 32, 3)
    tf = train_transforms(recipe, patch, 4, num_samples=4, slice_axis=slice_axis, label_names=["a", "b", "c"])
    tf.set_random_state(seed=1)
    lab = _blobs()
    rotated = 0
    for _ in range(3):
        for out in tf({"image": MetaTensor(lab.clone() * 10.0), "label": MetaTensor(lab.clone())}):
            image, label = np.asarray(out["image"]), np.asarray(out["label"])[0]
            if slice_axis is not None:
                assert image.shape == (3, 32, 32) and label.shape == (32, 32)
                image = image[1]  # the centre slice of the slab
            else:
                assert image.shape == (1, 32, 32, 16) and label.shape == patch
                image = image[0]
            assert set(np.unique(label)) <= {0.0, 1.0, 2.0, 3.0}  # nearest neighbour: no blended labels
            inside = _interior(label)
            assert inside.mean() > 0.2
            np.testing.assert_allclose(image[inside], 10.0 * label[inside], atol=1e-3)
            # near boundaries the bilinear image lies between the classes it borders
            rotated += int(not np.allclose(image, np.round(image)))
    assert rotated > 0  # the affine did resample


def test_elastic_deformation_keeps_alignment() -> None:
    recipe = dataclasses.replace(get_recipe("strong"), affine_prob=0.0, elastic_prob=1.0, **NO_INTENSITY)
    tf = train_transforms(recipe, (24, 24, 16), 4, num_samples=1)
    tf.set_random_state(seed=3)
    lab = _blobs((40, 36, 24))
    out = tf({"image": MetaTensor(lab.clone()), "label": MetaTensor(lab.clone())})[0]
    image, label = np.asarray(out["image"])[0], np.asarray(out["label"])[0]
    assert label.shape == (24, 24, 16)
    inside = _interior(label)
    assert (np.abs(image[inside] - label[inside]) < 0.05).mean() > 0.99


def test_intensity_augmentation_changes_only_the_image() -> None:
    recipe = dataclasses.replace(
        get_recipe("strong"), affine_prob=0.0, mirror="none", noise_prob=1.0, gamma_prob=1.0, brightness_prob=1.0
    )
    tf = train_transforms(recipe, (32, 32, 16), 4, num_samples=2)
    tf.set_random_state(seed=0)
    lab = _blobs()
    for out in tf({"image": MetaTensor(lab.clone()), "label": MetaTensor(lab.clone())}):
        label = np.asarray(out["label"])[0]
        assert set(np.unique(label)) <= {0.0, 1.0, 2.0, 3.0}
        assert not np.allclose(np.asarray(out["image"])[0], label)


def _side_ok(label: np.ndarray, right: int, left: int) -> bool | None:
    """In RAS, +x is the patient's right: the left kidney must lie at smaller x than the right one."""
    xr, xl = np.nonzero(label == right)[0], np.nonzero(label == left)[0]
    if not len(xr) or not len(xl):
        return None
    return bool(xl.mean() < xr.mean())


def test_kidney_left_stays_on_the_left(phantom_scan) -> None:
    """An LPS phantom through the training pipeline: after reorientation and the default
    recipe, kidney_left (4) never lies right of kidney_right (3); with `light` it does."""
    image_path, label_path = phantom_scan
    prep = Preprocessing(spacing=(3.0, 3.0, 6.0), intensity="ct")
    names = ["liver", "spleen", "kidney_right", "kidney_left"]
    data = preprocess_transforms(prep, ("image", "label"), label_ids=[1, 2, 3, 4])(
        {"image": read_scan(image_path), "label": read_scan(label_path)}
    )
    assert _side_ok(np.asarray(data["label"])[0], 3, 4)
    results = {}
    for name in ("default", "light"):
        tf = train_transforms(get_recipe(name), (40, 40, 16), 5, num_samples=8, label_names=names)
        tf.set_random_state(seed=0)
        torch.manual_seed(0)
        seen = []
        for _ in range(4):
            for out in tf({"image": data["image"].clone(), "label": data["label"].clone()}):
                seen.append(_side_ok(np.asarray(out["label"])[0], 3, 4))
        results[name] = [s for s in seen if s is not None]
    assert len(results["default"]) >= 10 and all(results["default"])
    assert not all(results["light"])  # flips across the body: the rule is what keeps the sides


def test_class_balanced_crops_reach_a_rare_class() -> None:
    lab = torch.zeros(1, 96, 96, 24)
    lab[0, 10:70, 10:70, :] = 1  # large organ
    lab[0, 85:88, 85:88, 10:13] = 2  # 27 voxels
    recipe = dataclasses.replace(get_recipe("strong"), affine_prob=0.0, **NO_INTENSITY)
    tf = train_transforms(recipe, (16, 16, 8), 3, num_samples=60)
    tf.set_random_state(seed=0)
    outs = tf({"image": MetaTensor(lab.clone()), "label": MetaTensor(lab.clone())})
    with_rare = sum(bool((np.asarray(o["label"]) == 2).any()) for o in outs)
    empty = sum(not np.asarray(o["label"]).any() for o in outs)
    assert with_rare >= 60 * 0.25 * 0.5  # a quarter of the crops target it (fg 0.5 over 2 classes)
    assert empty >= 5  # background crops come from anywhere, including organ-free parts


# --------------------------------------------------------------- CT fingerprint normalisation

FINGERPRINT = {"intensity": {"percentile_00_5": -60.0, "percentile_99_5": 240.0, "mean": 80.0, "std": 45.0}}


def test_fingerprint_preprocessing_round_trip() -> None:
    prep = Preprocessing(spacing=(2.0, 2.0, 3.0), intensity="ct-fingerprint").with_fingerprint(FINGERPRINT)
    assert prep.ct_norm() == (-60.0, 240.0, 80.0, 45.0)
    d = prep.to_dict()
    assert d["ct_clip"] == (-60.0, 240.0) and d["ct_mean"] == 80.0
    assert Preprocessing.from_dict(d) == prep
    old = Preprocessing.from_dict({"spacing": [1.5, 1.5, 2.0], "intensity": "ct"})
    assert old.ct_clip is None and "ct_clip" not in old.to_dict()
    assert Preprocessing(intensity="ct").with_fingerprint(FINGERPRINT).ct_clip is None
    with pytest.raises(MedvitError, match="without its statistics"):
        Preprocessing(intensity="ct-fingerprint").ct_norm()
    with pytest.raises(MedvitError, match="foreground"):
        Preprocessing(intensity="ct-fingerprint").with_fingerprint({"intensity": {"mean": None}})


def test_fingerprint_intensity_equal_in_training_and_segment() -> None:
    rng = np.random.default_rng(0)
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])
    scan = Scan(array=rng.integers(-1000, 1500, size=(23, 17, 11)).astype(np.int16), affine=affine,
                path=__import__("pathlib").Path("synthetic.nii.gz"))
    prep = Preprocessing(spacing=(1.5, 1.5, 2.0), intensity="ct-fingerprint").with_fingerprint(FINGERPRINT)
    ref = preprocess_transforms(prep, keys=("image",))({"image": scan})["image"].as_tensor()
    grid, shape = model_grid(scan.affine, scan.shape, prep.spacing, prep.orientation)
    ours = scale_intensity(resample_scan(scan.array, grid, scan.affine, shape), prep.intensity, prep.ct_window,
                           prep.ct_norm())
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    lo, hi = (-60.0 - 80.0) / 45.0, (240.0 - 80.0) / 45.0
    assert float(ref.min()) == pytest.approx(lo, abs=1e-5) and float(ref.max()) == pytest.approx(hi, abs=1e-5)
