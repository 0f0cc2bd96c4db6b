"""medvit: 3D medical image segmentation with Vision Transformers."""

from __future__ import annotations

__version__ = "0.1.0"

from medvit.registry import create_model, list_models, register_model  # noqa: E402
from medvit import losses  # noqa: E402,F401
from medvit import models as _models  # noqa: E402,F401  (registers the variants)

__all__ = ["create_model", "list_models", "losses", "register_model", "__version__"]
