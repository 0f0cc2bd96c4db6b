"""Few-second CPU configurations of every registered variant, for the tests.

They live with the tests, never in the production registry: a user's `create_model(name)`
always builds the variant as published. `tests/medvit/test_registry.py` checks that every
registered name has exactly one entry here.
"""

from __future__ import annotations

from typing import Any

# ---------------------------------------------------------------- image families, a-l

IMAGE_A_TO_L: dict[str, dict[str, Any]] = {}

# ---------------------------------------------------------------- image families m-z

IMAGE_M_TO_Z: dict[str, dict[str, Any]] = {}

# ---------------------------------------------------------------- video and volume families

VIDEO_AND_VOLUME: dict[str, dict[str, Any]] = {}

# ----------------------------------------------------------------

TINY: dict[str, dict[str, Any]] = {**IMAGE_A_TO_L, **IMAGE_M_TO_Z, **VIDEO_AND_VOLUME}


def tiny_overrides(name: str) -> dict[str, Any]:
    """The small test configuration of a registered variant (a fresh copy)."""
    if name not in TINY:
        raise KeyError(f"{name!r} has no tiny configuration in tests/tiny_configs.py")
    return dict(TINY[name])
