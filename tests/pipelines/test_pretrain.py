"""`medvit pretrain` on the shared real CT, and pretrained encoders loaded by `medvit train --init-encoder`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from medvit.pipelines.checkpoint import checkpoint_tensors, load_checkpoint, read_card
from medvit.pipelines.classify_train import ClassifyConfig, ClassifyTrainer
from medvit.pipelines.errors import MedvitError
from medvit.pipelines.phantom import write_phantom_dataset
from medvit.pipelines.pretrain import PretrainConfig, Pretrainer, pretrain
from medvit.pipelines.train import TrainConfig, Trainer

from helpers import cli_ok, cli_one_line_error, make_tiny_checkpoint

UNETR_ARGS = {"feature_size": 4, "skip_indices": [0, 1, 2], "encoder_args": {"embed_dim": 32, "depth": 3, "num_heads": 2}}
UNETR = ["--model", "unetr_tiny", "--model-arg", "feature_size=4", "--model-arg", "skip_indices=[0,1,2]",
         "--model-arg", 'encoder_args={"embed_dim": 32, "depth": 3, "num_heads": 2}']  # fmt: skip
QUICK = ["--crop", "32", "32", "32", "--spacing", "4", "4", "4", "--batch-size", "2", "--samples-per-volume", "1",
         "--max-steps", "2", "--device", "cpu", "-q"]  # fmt: skip
TINY_HEADS = {
    "moco": ["--method-arg", "dim=16", "--method-arg", "mlp_dim=32"],
    "dino": ["--method-arg", "out_dim=64", "--method-arg", "hidden_dim=32", "--method-arg", "bottleneck_dim=16",
             "--local-crops", "2"],
    "sit": ["--method-arg", "dim=16", "--method-arg", "mlp_dim=32", "--method-arg", "weights=[1,2,0.5]"],
}  # fmt: skip


ok, one_line_error = cli_ok, cli_one_line_error


@pytest.fixture(scope="module")
def scans(shared_data) -> list[Path]:
    return [shared_data / "ct" / "example_ct_sm.nii.gz", shared_data / "ct_dicom"]


@pytest.fixture(scope="module")
def pretrained(scans, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "dino"
    ok(["pretrain", *scans, "-o", out, "--method", "dino", *UNETR, *QUICK, *TINY_HEADS["dino"]])
    return out / "last.safetensors"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_phantom_dataset(tmp_path_factory.mktemp("ds"), 3, seed=5, shape=(40, 32, 16), spacing=(3.0, 3.0, 6.0))


@pytest.mark.parametrize("method", ["moco", "sit"])
def test_pretrain_each_method_on_real_ct_and_dicom(scans, tmp_path, method) -> None:
    out = tmp_path / method
    text = ok(["pretrain", *scans, "-o", out, "--method", method, *UNETR, *QUICK, *TINY_HEADS[method]])
    assert "pretrained 2 steps" in text
    for name in ("last.safetensors", "best.safetensors", "last_state.pt", "config.json"):
        assert (out / name).exists(), name
    card = read_card(out / "last.safetensors")
    assert card.task == "pretraining" and card.model_name == "unetr_tiny" and card.labels == {}
    assert card.extra["method"] == method and card.extra["weights"] == "encoder" and card.extra["step"] == 2
    assert card.preprocessing["spacing"] == [4.0, 4.0, 4.0] and card.patch_size == (32, 32, 32)
    if method == "sit":
        assert card.extra["hyper_parameters"]["weights"] == [1.0, 2.0, 0.5]
    else:
        assert card.extra["hyper_parameters"]["T"] == 0.2 and card.extra["hyper_parameters"]["dim"] == 16
    encoder, _ = load_checkpoint(out / "last.safetensors")  # the card rebuilds the UNETR's encoder
    assert encoder.num_prefix_tokens == 0 and tuple(encoder.img_size) == (32, 32, 32)
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr"} <= set(events.Tags()["scalars"])
    if method == "sit":
        assert {"sit/rotation", "sit/reconstruction", "sit/contrastive"} <= set(events.Tags()["scalars"])


def test_dino_run_logs_teacher_entropy_and_saves_the_teacher(pretrained) -> None:
    out = pretrained.parent
    card = read_card(pretrained)
    assert card.extra["method"] == "dino" and card.extra["local_crop"] == [16, 16, 16]
    assert card.extra["hyper_parameters"]["teacher_temp"] == 0.04
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    entropy = [e.value for e in events.Scalars("dino/teacher_entropy")]
    centre = [e.value for e in events.Scalars("dino/center_norm")]
    assert len(entropy) == 2 and 0 <= max(entropy) <= np.log(64) + 1e-4 and min(centre) > 0
    state = torch.load(out / "last_state.pt", weights_only=True)
    teacher = {k[len("teacher.encoder."):]: v for k, v in state["method"].items() if k.startswith("teacher.encoder.")}
    saved = dict(checkpoint_tensors(pretrained))
    assert set(saved) == set(teacher) and all(torch.equal(saved[k], teacher[k]) for k in saved)


def test_init_encoder_fills_the_unetr_encoder(pretrained, dataset, tmp_path) -> None:
    cfg = TrainConfig(data=dataset, out_dir=tmp_path, model="unetr_tiny", model_args=UNETR_ARGS, max_steps=1,
                      patch_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), batch_size=2, samples_per_volume=1,
                      progress=False, init_encoder=pretrained)  # fmt: skip
    trainer = Trainer(cfg)
    saved = dict(checkpoint_tensors(pretrained))
    own = trainer.model.encoder.state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)
    trainer.run()
    card = read_card(tmp_path / "last.safetensors")
    assert card.extra["init_encoder"] == {"path": str(pretrained), "model": "unetr_tiny", "method": "dino"}


def test_init_encoder_mismatch_and_wrong_checkpoint_are_refused_in_one_line(pretrained, dataset, tmp_path) -> None:
    other = ["--model", "unetr_tiny", "--model-arg", "feature_size=4", "--model-arg", "skip_indices=[0,1,2]",
             "--model-arg", 'encoder_args={"embed_dim": 16, "depth": 3, "num_heads": 2}']  # fmt: skip
    common = ["--patch-size", "32", "32", "32", "--spacing", "4", "4", "4", "--max-steps", "1", "-q"]
    line = one_line_error(["train", dataset, "-o", tmp_path / "a", *other, *common, "--init-encoder", pretrained],
                          "does not fit the model's encoder", "(32,", "(16,")  # fmt: skip
    assert "blocks.0." in line and str(pretrained) in line
    larger = ["--patch-size", "64", "64", "64", *common[4:]]
    one_line_error(["train", dataset, "-o", tmp_path / "b", *UNETR, *larger, "--init-encoder", pretrained],
                   "pos_embed", "(1, 8, 32)", "(1, 64, 32)")  # fmt: skip
    seg = tmp_path / "seg.safetensors"
    make_tiny_checkpoint(seg)
    one_line_error(["train", dataset, "-o", tmp_path / "c", *UNETR, *common, "--init-encoder", seg],
                   "a segmentation checkpoint", "medvit pretrain")  # fmt: skip


def test_swin_unetr_encoder_pretrains_and_loads(scans, dataset, tmp_path) -> None:
    swin = ["--model", "swin_unetr_small", "--model-arg", "feature_size=6", "--model-arg", "depth=[2,2,1]",
            "--model-arg", "num_heads=[1,2,2]", "--model-arg", "window_size=5"]  # fmt: skip
    ok(["pretrain", scans[0], "-o", tmp_path / "p", "--method", "moco", *swin, *QUICK, *TINY_HEADS["moco"]])
    ckpt = tmp_path / "p" / "last.safetensors"
    assert read_card(ckpt).extra["hyper_parameters"]["freeze_patch_embed"] is False  # not a plain ViT
    args = {"feature_size": 6, "depth": [2, 2, 1], "num_heads": [1, 2, 2], "window_size": 5}
    trainer = Trainer(TrainConfig(data=dataset, out_dir=tmp_path / "t", model="swin_unetr_small", model_args=args,
                                  max_steps=1, patch_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), progress=False,
                                  init_encoder=ckpt))  # fmt: skip
    saved = dict(checkpoint_tensors(ckpt))
    own = trainer.model.encoder.state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)


def test_2d_backbone_on_axial_slices_initialises_a_classifier(scans, tmp_path) -> None:
    vit = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
    pretrain(PretrainConfig(data=[scans[0]], out_dir=tmp_path / "p", method="dino", model="vit_tiny_patch16_224",
                            model_args=vit, spatial_dims=2, crop=(32, 32), local_crops=2, spacing=(4.0, 4.0, 4.0),
                            method_args={"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}, max_steps=2,
                            batch_size=2, samples_per_volume=1, device="cpu", progress=False))  # fmt: skip
    ckpt = tmp_path / "p" / "last.safetensors"
    card = read_card(ckpt)
    assert card.extra["weights"] == "model" and card.slicing == {"axis": 2, "slab": 1} and card.patch_size == (32, 32)
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, lo in (("dark", 40), ("bright", 170)):
        (images / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(lo, lo + 40, (32, 32), dtype=np.uint8)).save(images / name / f"{i}.png")
    trainer = ClassifyTrainer(ClassifyConfig(data=images, out_dir=tmp_path / "c", model="vit_tiny_patch16_224",
                                             model_args=vit, size=(32, 32), in_chans=1, max_steps=1, batch_size=4,
                                             device="cpu", progress=False, init_encoder=ckpt))  # fmt: skip
    saved = dict(checkpoint_tensors(ckpt))
    own = trainer.model.state_dict()
    assert {k for k in own if k not in saved} == {"head.weight", "head.bias"}  # the head stays random
    assert all(torch.equal(own[k], saved[k]) for k in saved)


def test_resumed_pretraining_repeats_the_lost_steps_exactly(scans, tmp_path) -> None:
    def config(out: Path, **kw) -> PretrainConfig:
        base = dict(data=[scans[0]], out_dir=out, method="moco", model="unetr_tiny", model_args=UNETR_ARGS,
                    method_args={"dim": 16, "mlp_dim": 32}, crop=(32, 32, 32), spacing=(4.0, 4.0, 4.0), epochs=3,
                    batch_size=2, samples_per_volume=2, lr=1e-3, device="cpu", progress=False)  # fmt: skip
        return PretrainConfig(**{**base, **kw})

    pretrain(config(tmp_path / "straight"))

    class Killed(Exception):
        pass

    interrupted = Pretrainer(config(tmp_path / "resumed"))
    save = interrupted._end_of_epoch

    def end_then_die(writer) -> None:
        save(writer)
        if interrupted.epoch == 2:
            raise Killed

    interrupted._end_of_epoch = end_then_die
    with pytest.raises(Killed):
        interrupted.run()
    result = pretrain(config(tmp_path / "resumed", resume=True))
    assert result.steps == 3 and result.epochs == 3
    a = dict(checkpoint_tensors(tmp_path / "straight" / "last.safetensors"))
    b = dict(checkpoint_tensors(tmp_path / "resumed" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MedvitError, match="resume with the same method"):
        Pretrainer(config(tmp_path / "resumed", resume=True, method_args={"dim": 8, "mlp_dim": 32}))


def test_bad_options_are_one_line(scans, tmp_path) -> None:
    one_line_error(["pretrain", scans[0], "-o", tmp_path / "a", "--method", "moco", *UNETR, *QUICK,
                    "--method-arg", "temperature=0.1"], "temperature", "not an option of moco")  # fmt: skip
    one_line_error(["pretrain", tmp_path / "nothing.nii.gz", "-o", tmp_path / "b", *UNETR, *QUICK],
                   "nothing.nii.gz", "no such file")  # fmt: skip
    one_line_error(["pretrain", scans[0], "-o", tmp_path / "c", "--model", "convit_tiny", *QUICK],
                   "no 3D form")  # fmt: skip


def test_2d_images_folder_pretrains_with_an_image_card(tmp_path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    out = tmp_path / "run"
    ok(["pretrain", tmp_path / "imgs", "-o", out, "--method", "sit", "--model", "vit_tiny_patch16_224",
        "--model-arg", "embed_dim=32", "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--model-arg",
        "patch_size=8", "--spatial-dims", "2", "--crop", "32", "32", "1", "--max-steps", "1", "--batch-size", "2",
        "--device", "cpu", "-q", *TINY_HEADS["moco"]])  # fmt: skip
    card = read_card(out / "last.safetensors")
    assert card.preprocessing == {"kind": "image", "in_chans": 1, "intensity": "auto"} and card.slicing is None
    assert card.patch_size == (32, 32) and card.model_args["spatial_dims"] == 2


def test_segment_and_predict_refuse_a_pretraining_checkpoint(pretrained, scans, tmp_path) -> None:
    for cmd in (["segment", scans[0], "-m", pretrained, "-o", tmp_path / "seg"],
                ["predict", scans[0], "-m", pretrained, "-o", tmp_path / "p.csv"]):  # fmt: skip
        one_line_error(cmd, "a pretraining checkpoint", "--init-encoder")


def test_ddp_two_cpu_processes_gather_keys_and_report_once(scans, tmp_path) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medvit.cli",
           "pretrain", *map(str, scans), "-o", str(out), "--method", "moco", *UNETR, *QUICK, "--samples-per-volume",
           "2", *TINY_HEADS["moco"]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pretrained 2 steps") == 1  # rank 0 reports
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    card = read_card(out / "last.safetensors")
    assert card.extra["step"] == 2 and card.extra["epoch"] == 2  # 4 samples over 2 ranks, batch 2: a step an epoch
