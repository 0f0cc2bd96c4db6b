"""medvit: 3D medical image segmentation with Vision Transformers.

Importing the package is cheap: the registry imports torch and a model family only when a
model is built (`create_model`), so `medvit --help` and `medvit models` answer at once.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from medvit.registry import create_model, list_models, register_model  # noqa: E402

__all__ = ["create_model", "list_models", "losses", "register_model", "__version__"]


def __getattr__(name: str) -> Any:
    # `medvit.losses` (torch) loads on first use
    if name == "losses":
        return importlib.import_module("medvit.losses")
    raise AttributeError(f"module 'medvit' has no attribute {name!r}")
