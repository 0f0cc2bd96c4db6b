"""`medvit attention` on the shared real CT (segmentation) and on an image (classification)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from medvit.cli.main import main
from medvit.pipelines.checkpoint import ModelCard, save_checkpoint
from PIL import Image
from tiny_configs import tiny_overrides

import medvit


def _invoke(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_user_error(result: Result, *words: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for w in words:
        assert w in lines[0], result.output


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def real_ct(shared_data: Path) -> Path:
    path = shared_data / "ct" / "example_ct_sm.nii.gz"
    if not path.exists():
        pytest.skip("shared real CT not present")
    return path


def test_real_ct_with_a_unetr_checkpoint(real_ct: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "att"
    res = _invoke("attention", real_ct, "-m", tiny_checkpoint, "-o", out, "--rollout", "--device", "cpu")
    assert res.exit_code == 0, res.output
    # the tiny UNETR's ViT encoder has three blocks of two heads
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "attention_distance.png", "attention_layer00.png", "attention_layer01.png", "attention_layer02.png",
        "attention_rollout.png",
    ]
    assert not list(out.glob("*.tmp*"))
    rows = _rows(out / "attention_distance.csv")
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(i, h) for i in range(3) for h in range(2)]
    assert {r["name"] for r in rows} == {f"encoder.blocks.{i}.attn" for i in range(3)}
    # a 32^3 window of 3 x 3 x 4 mm voxels (the checkpoint's spacing)
    diagonal_mm = math.dist((0, 0, 0), (32 * 3.0, 32 * 3.0, 32 * 4.0))
    for r in rows:
        px, mm = float(r["distance_px"]), float(r["distance_mm"])
        assert 0 < mm <= diagonal_mm and 0 < px <= math.dist((0, 0, 0), (32, 32, 32))
        assert 3.0 * px <= mm + 1e-6 and mm <= 4.0 * px + 1e-6
    # random weights attend almost evenly: close to the mean distance between the cells of
    # the encoder's 2 x 2 x 2 grid of 16 px tokens, over all pairs, by hand
    pos = np.stack(np.meshgrid(*[np.arange(2) * 16.0] * 3, indexing="ij"), -1).reshape(-1, 3)
    even = np.linalg.norm(pos[:, None] - pos[None], axis=-1).mean()
    assert float(rows[0]["distance_px"]) == pytest.approx(even, rel=0.01)
    img = Image.open(out / "attention_layer00.png")
    assert img.mode == "RGB" and min(img.size) >= 256
    assert len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 50  # a picture, not a flat fill
    plot = Image.open(out / "attention_distance.png")
    assert plot.size == (640, 400)


def test_one_layer_at_a_voxel_and_bad_options(real_ct: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "one"
    res = _invoke("attention", real_ct, "-m", tiny_checkpoint, "-o", out, "--layer", "1", "--at", "10,10,5",
                  "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("attention_layer*.png")) == ["attention_layer01.png"]
    _assert_user_error(_invoke("attention", real_ct, "-m", tiny_checkpoint, "-o", out, "--layer", "7"),
                       "--layer 7", "drawable: 0, 1, 2")
    _assert_user_error(_invoke("attention", real_ct, "-m", tiny_checkpoint, "-o", out, "--at", "1,2"),
                       "--at")
    _assert_user_error(_invoke("attention", real_ct, "-m", tiny_checkpoint, "-o", out, "--at", "0,0,99999"),
                       "example_ct_sm.nii.gz", "outside")


def _classifier(tmp_path: Path, name: str) -> Path:
    args = {**tiny_overrides(name), "num_classes": 2}
    torch.manual_seed(0)
    model = medvit.create_model(name, **args)
    card = ModelCard(
        model_name=name, model_args=args, labels={0: {"id": 0, "name": "a"}, 1: {"id": 1, "name": "b"}},
        preprocessing={"kind": "image", "in_chans": 3}, patch_size=tuple(model.img_size), task="classification",
    )
    return save_checkpoint(model, card, tmp_path / f"{name}.safetensors")


def test_an_image_with_a_deit_classifier(tmp_path: Path) -> None:
    ckpt = _classifier(tmp_path, "deit_tiny_distilled_patch16_224")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "cls"
    res = _invoke("attention", image, "-m", ckpt, "-o", out, "--rollout", "--device", "cpu")
    assert res.exit_code == 0, res.output
    rows = _rows(out / "attention_distance.csv")
    # an image has no physical spacing: pixels only
    assert rows and all(r["distance_mm"] == "" and 0 < float(r["distance_px"]) <= math.dist((0, 0), (32, 32))
                        for r in rows)
    assert (out / "attention_rollout.png").exists() and (out / "attention_layer01.png").exists()
    _assert_user_error(_invoke("attention", image, "-m", ckpt, "-o", out, "--at", "1,2,3"), "segmentation")


def test_a_model_without_attention_is_one_line(tmp_path: Path) -> None:
    ckpt = _classifier(tmp_path, "mixer_s16_224")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    _assert_user_error(_invoke("attention", image, "-m", ckpt, "-o", tmp_path / "o"), "no attention layers")


def test_a_2d_segformer_on_axial_slices_of_the_real_ct(real_ct: Path, tmp_path: Path) -> None:
    name = "segformer_b0"
    args = {**tiny_overrides(name), "num_classes": 3}
    torch.manual_seed(0)
    model = medvit.create_model(name, **args)
    card = ModelCard(
        model_name=name, model_args=args, labels={1: {"id": 1, "name": "a"}, 2: {"id": 2, "name": "b"}},
        preprocessing={"spacing": [1.5, 1.5, 5.0], "intensity": "ct"}, patch_size=(32, 32),
        slicing={"axis": 2, "slab": 1},
    )
    ckpt = save_checkpoint(model, card, tmp_path / "segformer.safetensors")
    out = tmp_path / "sf"
    res = _invoke("attention", real_ct, "-m", ckpt, "-o", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    rows = _rows(out / "attention_distance.csv")
    # four stages of spatial-reduction attention over the axial plane (1.5 mm pixels)
    assert len({r["layer"] for r in rows}) == 4
    for r in rows:
        px, mm = float(r["distance_px"]), float(r["distance_mm"])
        assert mm == pytest.approx(1.5 * px, abs=1e-3) and 0 <= mm <= math.dist((0, 0), (48, 48))
    assert len(list(out.glob("attention_layer*.png"))) == 4
