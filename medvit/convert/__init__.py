"""Checkpoint converters from other libraries, one package per source.

Each source package (`timm`, `monai`, `torchvision`, and `inflate` for image-to-video
initialisation) keeps a registry of mapping functions keyed by the medvit model class,
one module per model family; its `load_*` entry point looks the mapper up by the model's
class and loads strictly.
"""

from __future__ import annotations

from medvit.convert.inflate import inflate_image_to_video, register_inflater
from medvit.convert.monai import load_monai, register_monai_mapper
from medvit.convert.timm import load_timm, register_timm_mapper
from medvit.convert.torchvision import load_torchvision, register_torchvision_mapper

__all__ = [
    "inflate_image_to_video",
    "load_monai",
    "load_timm",
    "load_torchvision",
    "register_inflater",
    "register_monai_mapper",
    "register_timm_mapper",
    "register_torchvision_mapper",
]
