"""Checkpoint converters from other libraries, one module per source."""

from __future__ import annotations

from medvit.convert.monai import load_monai
from medvit.convert.timm import load_timm, register_timm_mapper

__all__ = ["load_monai", "load_timm", "register_timm_mapper"]
