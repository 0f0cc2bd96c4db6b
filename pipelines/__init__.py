"""MONAI-based workflows: io, transforms, data, train, segment, evaluate, export."""

from __future__ import annotations
