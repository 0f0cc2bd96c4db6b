"""`medvit train` with recipes: the default, selection by name, fingerprint normalisation in the
card, post-processing chosen at validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from monai.transforms import RandFlipd

from medvit.cli.main import main
from medvit.pipelines.checkpoint import read_card
from medvit.pipelines.crop_sampling import SampleCropsd
from medvit.pipelines.dataset_preprocessing import PreprocessConfig, preprocess_dataset
from medvit.pipelines.datasets import load_dataset
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.fingerprint import compute_fingerprint
from medvit.pipelines.io import read_scan
from medvit.pipelines.phantom import write_phantom_dataset
from medvit.pipelines.segment import Segmenter, SegmentConfig
from medvit.pipelines.train import TrainConfig, TrainResult, Trainer, train
from medvit.pipelines.transforms import preprocess_transforms

from helpers import TINY_UNETR_ARGS

MODEL_ARGS = {k: v for k, v in TINY_UNETR_ARGS.items() if k not in ("img_size", "num_classes", "in_chans")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 2, seed=7, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


def config(dataset, out, **kw) -> TrainConfig:
    base = dict(
        data=dataset, out_dir=out, model="unetr_tiny", model_args=MODEL_ARGS, epochs=1, patch_size=(32, 32, 32),
        spacing=(4.0, 4.0, 4.0), batch_size=2, samples_per_volume=1, lr=1e-3, progress=False, val_fraction=0.5,
    )
    base.update(kw)
    return TrainConfig(**base)


def _steps(trainer: Trainer) -> list:
    return list(trainer.train_loader.dataset.transform.transforms)


def test_default_recipe_is_strong_and_lr_safe(dataset, tmp_path) -> None:
    trainer = Trainer(config(dataset, tmp_path))
    assert trainer.cfg.recipe == "default" and trainer.recipe.name == "strong"
    steps = _steps(trainer)
    assert any(isinstance(t, SampleCropsd) and t.ratios is not None for t in steps)  # class-balanced
    flips = [t.flipper.spatial_axis for t in steps if isinstance(t, RandFlipd)]
    assert flips == [1, 2]  # the phantom's kidneys are lateralised: never flipped across the body
    # the case on disk in model space, with the crop-centre indices of every class
    cached = trainer.train_loader.dataset.case(0)
    image, label = cached.arrays()
    assert image.shape[1:] == label.shape == cached.shape and image.shape[0] == 1
    for k in range(trainer.num_classes):
        centres = cached.centres(f"class{k}")
        assert centres.size and (label.reshape(-1)[centres] == k).all()

    light = Trainer(config(dataset, tmp_path / "light", recipe="light"))
    steps = _steps(light)
    assert any(isinstance(t, SampleCropsd) and t.ratios is None for t in steps)  # pos-neg
    assert [t.flipper.spatial_axis for t in steps if isinstance(t, RandFlipd)] == [0, 1, 2]
    with pytest.raises(MedvitError, match="unknown training recipe 'heavy'"):
        Trainer(config(dataset, tmp_path / "x", recipe="heavy"))


def test_training_records_fingerprint_normalisation_and_postprocessing(dataset, tmp_path) -> None:
    result = train(config(dataset, tmp_path, intensity="ct-fingerprint", recipe="strong-poly"))
    assert result.steps == 1
    card = read_card(tmp_path / "last.safetensors")
    stats = compute_fingerprint(load_dataset(dataset))["intensity"]
    prep = card.preprocessing
    assert prep["intensity"] == "ct-fingerprint"
    assert prep["ct_clip"] == [stats["percentile_00_5"], stats["percentile_99_5"]]
    assert prep["ct_mean"] == pytest.approx(stats["mean"]) and prep["ct_std"] == pytest.approx(stats["std"])
    assert json.loads((tmp_path / "config.json").read_text())["recipe"] == "strong-poly"
    # chosen on the validation predictions: a list (possibly empty) of well-formed rules
    assert isinstance(card.postprocessing, list)
    for rule in card.postprocessing:
        assert rule["rule"] in ("largest", "min_ml") and rule["id"] in card.label_names()
    assert read_card(tmp_path / "best.safetensors").postprocessing is not None

    # `medvit segment` normalises exactly as training did
    spec = load_dataset(dataset)
    seg = Segmenter(tmp_path / "last.safetensors", SegmentConfig(progress=False, precision="fp32"))
    scan = read_scan(spec.cases[0].image)
    ours = seg.prepare(scan).images[0]
    ref = preprocess_transforms(seg.prep, keys=("image",))({"image": scan})["image"]
    np.testing.assert_allclose(ours.numpy(), ref.numpy(), atol=1e-4)
    assert float(ref.min()) == pytest.approx((prep["ct_clip"][0] - prep["ct_mean"]) / prep["ct_std"], abs=1e-4)


def test_cli_train_default_recipe_and_unknown_name(dataset, tmp_path, monkeypatch) -> None:
    import medvit.pipelines.train as train_module

    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        return TrainResult(tmp_path, 0, 0, 0.0, {})

    monkeypatch.setattr(train_module, "train", fake)
    res = CliRunner().invoke(main, ["train", str(dataset), "-o", str(tmp_path / "run"), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert seen["cfg"].recipe == "default" and seen["cfg"].intensity is None
    res = CliRunner().invoke(main, ["train", str(dataset), "-o", str(tmp_path / "run"), "--recipe", "light",
                                    "--intensity", "ct-fingerprint", "-q"], catch_exceptions=False)
    assert res.exit_code == 0 and seen["cfg"].recipe == "light" and seen["cfg"].intensity == "ct-fingerprint"
    monkeypatch.undo()
    res = CliRunner().invoke(main, ["train", str(dataset), "-o", str(tmp_path / "bad"), "--recipe", "heavy", "-q"])
    assert res.exit_code == 1
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1 and "unknown training recipe 'heavy'" in errors[0] and "Traceback" not in res.output


def test_preprocess_with_fingerprint_normalisation(dataset, tmp_path) -> None:
    spec = load_dataset(dataset)
    out = preprocess_dataset(spec, tmp_path / "pre", PreprocessConfig(spacing=(4.0, 4.0, 4.0), intensity="ct-fingerprint"),
                             progress=False)
    manifest = json.loads((out / "medvit_preprocessed.json").read_text())
    stats = json.loads((out / "fingerprint.json").read_text())["intensity"]
    prep = manifest["preprocessing"]
    assert prep["ct_clip"] == [stats["percentile_00_5"], stats["percentile_99_5"]] and prep["ct_std"] == stats["std"]
    image = read_scan(out / "imagesTr" / f"{spec.cases[0].name}.nii.gz").array
    assert float(image.min()) == pytest.approx((prep["ct_clip"][0] - prep["ct_mean"]) / prep["ct_std"], abs=1e-4)
    assert load_dataset(out).preprocessing["ct_mean"] == prep["ct_mean"]
