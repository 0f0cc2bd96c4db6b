"""Shared fixtures: seeded RNG, the shared real-data folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ct" / "example_ct.nii.gz").exists():
        pytest.skip(f"shared real scans not found at {SHARED_DATA} (a clone outside the workplace)")
    return SHARED_DATA
