"""Helpers shared by tests (importable: `tests/` is on pytest's pythonpath)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

TINY_UNETR_ARGS = dict(
    img_size=(32, 32, 32),
    num_classes=5,
    in_chans=1,
    feature_size=4,
    skip_indices=[0, 1, 2],
    encoder_args=dict(embed_dim=32, depth=3, num_heads=2),
)
PHANTOM_LABELS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}

# Under MEDVIT_TEST_STRICT=1 (CI) a missing reference library fails the test that needs it, so
# a run can never be green by skipping its parity tests.
STRICT = os.environ.get("MEDVIT_TEST_STRICT") == "1"


def require(module: str) -> ModuleType:
    """Import a reference library (timm, MONAI networks, torchvision video) for a parity test.

    Skips the calling test when it is not importable, or fails it under MEDVIT_TEST_STRICT=1.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        message = f"reference library {module} is not importable ({err})"
        if STRICT:
            pytest.fail(f"MEDVIT_TEST_STRICT=1: {message}", pytrace=False)
        pytest.skip(message)


def make_tiny_checkpoint(path: Path, spacing=(3.0, 3.0, 4.0), seed: int = 0) -> Path:
    """A random-weight tiny UNETR checkpoint with the phantom's labels."""
    import medvit
    from medvit.pipelines.checkpoint import ModelCard, save_checkpoint

    torch.manual_seed(seed)
    model = medvit.create_model("unetr_tiny", **TINY_UNETR_ARGS)
    card = ModelCard(
        model_name="unetr_tiny",
        model_args=TINY_UNETR_ARGS,
        labels={i: {"id": i, "name": n} for i, n in PHANTOM_LABELS.items()},
        preprocessing={"spacing": list(spacing), "intensity": "ct"},
        patch_size=(32, 32, 32),
    )
    return save_checkpoint(model, card, path)


def dicom_series_with_uids(source: Path, dest: Path) -> Path:
    """A copy of the DICOM series in `source` with the study and series UIDs its anonymiser
    blanked (a SEG must name them), fixed values the same on every slice."""
    import pydicom

    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.10"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.11"
        ds.save_as(dest / path.name)
    return dest


def cli_run(args: list):
    """`medvit ARGS` through click's test runner (arguments made strings)."""
    from click.testing import CliRunner

    from medvit.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def cli_ok(args: list) -> str:
    """The output of `medvit ARGS`, which must succeed."""
    result = cli_run(args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def cli_one_line_error(args: list, *fragments: str) -> str:
    """The one `Error:` line of `medvit ARGS`, which must fail without a traceback and name `fragments`."""
    result = cli_run(args)
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def scan_affines() -> list[np.ndarray]:
    """Scan affines: LPS, oblique (rotated 17 degrees in plane), and axes permuted."""
    lps = np.diag([-0.8, -0.8, 2.5, 1.0])
    lps[:3, 3] = [100.0, 120.0, -40.0]
    a = np.deg2rad(17)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([1.1, 0.9, 3.0])
    oblique[:3, 3] = [-20.0, 5.0, 7.5]
    permuted = np.array([[0, 0, 2.0, 1.0], [1.5, 0, 0, -3.0], [0, -1.2, 0, 4.0], [0, 0, 0, 1]])
    return [lps, oblique, permuted]
