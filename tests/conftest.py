"""Shared fixtures: seeded RNG, the shared real-data folder, the parity tests' reference libraries.

Only the parity tests need timm or MONAI's networks: they take the `timm` / `monai_nets`
fixtures, which skip the test when the library is missing (fail it under
MEDVIT_TEST_STRICT=1), so every other test still runs without them.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest
import torch

from helpers import make_tiny_checkpoint, require

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _case_cache(tmp_path_factory) -> None:
    """Training's preprocessed-case cache in a folder of this test session (inherited by the
    CLI subprocesses), not the user's."""
    import os

    os.environ["MEDVIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("case_cache"))


@pytest.fixture(scope="session")
def timm() -> ModuleType:
    return require("timm")


@pytest.fixture(scope="session")
def monai_nets() -> ModuleType:
    return require("monai.networks.nets")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ct" / "example_ct.nii.gz").exists():
        pytest.skip(f"shared real scans not found at {SHARED_DATA} (a clone outside the workplace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def phantom_scan(tmp_path_factory) -> tuple[Path, Path]:
    """A small LPS phantom (image, labels) on disk."""
    from medvit.pipelines.phantom import make_phantom, save_phantom

    folder = tmp_path_factory.mktemp("phantom")
    ph = make_phantom(seed=3, shape=(48, 40, 20), spacing=(3.0, 3.0, 6.0), orientation="LPS")
    img, lab = folder / "phantom.nii.gz", folder / "phantom_labels.nii.gz"
    save_phantom(ph, img, lab)
    return img, lab
