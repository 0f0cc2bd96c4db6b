"""Checkpoint converters from other libraries, one module per source."""

from __future__ import annotations

from medvit.convert.inflate import inflate_image_to_video, register_inflater
from medvit.convert.monai import load_monai
from medvit.convert.timm import load_timm, register_timm_mapper

__all__ = ["inflate_image_to_video", "load_monai", "load_timm", "register_inflater", "register_timm_mapper"]
