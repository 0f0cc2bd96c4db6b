"""Segmentation models for volumes (and slices); importing registers their variants."""

from __future__ import annotations

from medvit.models.volume import unetr  # noqa: F401
from medvit.models.volume.unetr import UNETR

__all__ = ["UNETR"]
