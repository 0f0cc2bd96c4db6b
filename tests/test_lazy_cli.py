"""The command line answers at once: a bare `medvit --help`, `medvit models` or a usage error
imports neither torch nor a model family (checked by the modules a fresh interpreter loads)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
from click.testing import CliRunner
from medvit.cli.main import main
result = CliRunner().invoke(main, sys.argv[1:])
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("torch", "numpy", "monai", "nibabel", "SimpleITK", "timm")
               or m.startswith("medvit.models.") or m == "medvit.losses")
print(json.dumps({"code": result.exit_code, "output": result.output, "heavy": heavy}))
"""


def _loaded_by(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    "args, code, shown",
    [
        (("--help",), 0, "segment"),
        (("models",), 0, "vit_base_patch16_224"),
        (("models", "video*"), 0, "timesformer_base"),
        (("segment",), 2, "Missing argument"),
        (("train", "--help"), 0, "--recipe"),
        (("export", "--help"), 0, "--opset"),
        (("export",), 2, "Missing argument"),
        (("no-such-command",), 2, "No such command"),
    ],
)
def test_cli_answers_without_torch_or_model_families(args: tuple[str, ...], code: int, shown: str) -> None:
    probe = _loaded_by(*args)
    assert probe["code"] == code, probe["output"]
    assert shown in probe["output"]
    assert probe["heavy"] == []


def test_models_params_imports_only_the_families_it_counts() -> None:
    probe = _loaded_by("models", "unetr_tiny", "--params")
    assert probe["code"] == 0, probe["output"]
    families = {m for m in probe["heavy"] if m.startswith("medvit.models.") and m.count(".") == 3}
    # UNETR-tiny builds its ViT encoder: exactly those two families are imported
    assert families == {"medvit.models.volume.unetr", "medvit.models.image.vit"}
