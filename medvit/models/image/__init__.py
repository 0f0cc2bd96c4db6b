"""2D image backbones; importing this package registers their variants."""

from __future__ import annotations

from medvit.models.image import vit  # noqa: F401
from medvit.models.image.vit import VisionTransformer

__all__ = ["VisionTransformer"]
