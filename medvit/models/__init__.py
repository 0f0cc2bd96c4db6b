"""Model families; importing this package registers every variant."""

from __future__ import annotations

from medvit.models import image, video, volume  # noqa: F401
