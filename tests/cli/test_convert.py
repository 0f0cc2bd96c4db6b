"""`medvit convert`: MONAI and timm weights become medvit checkpoints that compute the same."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner

from medvit.cli.main import main
from medvit.pipelines.checkpoint import load_checkpoint, read_card

from helpers import require

SMALL = dict(hidden_size=96, mlp_dim=192, num_heads=4, feature_size=8)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def monai_unetr(tmp_path):
    nets = require("monai.networks.nets")
    torch.manual_seed(0)
    ref = nets.UNETR(1, 3, (32, 32, 32), **SMALL).eval()
    path = tmp_path / "monai_unetr.pt"
    torch.save({"epoch": 7, "state_dict": ref.state_dict()}, path)  # a typical training-script file
    return ref, path


def test_convert_monai_unetr_then_same_logits(tmp_path, monai_unetr) -> None:
    ref, path = monai_unetr
    out = tmp_path / "unetr.safetensors"
    res = run(
        "convert", path, "-o", out, "--from", "monai", "--model", "unetr_base", "--num-classes", 3,
        "--img-size", 32, 32, 32, "--model-arg", "feature_size=8",
        "--model-arg", 'encoder_args={"embed_dim": 96, "num_heads": 4, "mlp_ratio": 2.0}',
        "--spacing", 1.5, 1.5, 2.0, "--labels", "liver", "--labels", "tumour",
    )
    assert res.exit_code == 0, res.output
    card = read_card(out)
    assert card.label_names() == {1: "liver", 2: "tumour"} and card.patch_size == (32, 32, 32)
    assert card.preprocessing["spacing"] == [1.5, 1.5, 2.0] and card.extra["converted_from"] == "monai"
    model, _ = load_checkpoint(out)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)


def test_convert_timm_vit(tmp_path, timm: ModuleType) -> None:
    ref = timm.create_model("vit_small_patch16_224", depth=2, img_size=64, num_classes=4).eval()
    path = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(path))
    out = tmp_path / "vit.safetensors"
    res = run("convert", path, "-o", out, "--from", "timm", "--model", "vit_small_patch16_224",
              "--num-classes", 4, "--model-arg", "depth=2", "--model-arg", "img_size=64", "--intensity", "none")
    assert res.exit_code == 0, res.output
    model, _ = load_checkpoint(out)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=0)


def test_convert_refuses_pickled_code_and_mismatches(tmp_path, monai_unetr) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    res = run("convert", evil, "-o", tmp_path / "o.safetensors", "--from", "monai", "--model", "unetr_base")
    assert res.exit_code != 0 and "evil.pt" in res.output and "Traceback" not in res.output
    assert not marker.exists()

    _, path = monai_unetr  # weights of another width than unetr_base's defaults
    res = run("convert", path, "-o", tmp_path / "o.safetensors", "--from", "monai", "--model", "unetr_base",
              "--num-classes", 3, "--img-size", 32, 32, 32)
    assert res.exit_code != 0 and "do not fit" in res.output
    assert not (tmp_path / "o.safetensors").exists()
    res = run("convert", tmp_path / "none.pt", "-o", tmp_path / "o.safetensors", "--from", "monai", "--model", "unetr_base")
    assert res.exit_code != 0 and "none.pt" in res.output
    (tmp_path / "text.pt").write_text(json.dumps({"a": 1}))
    res = run("convert", tmp_path / "text.pt", "-o", tmp_path / "o.safetensors", "--from", "monai", "--model", "unetr_base")
    assert res.exit_code != 0 and "text.pt" in res.output


def test_convert_does_not_import_monai() -> None:
    """`medvit convert` maps MONAI's weights with medvit's own code: MONAI (~300 MB, seconds
    to import) is not loaded by the command nor by the conversion it runs."""
    code = (
        "import sys, medvit.cli.convert, medvit.pipelines.convert_weights; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"
