"""What a checkpoint records about bringing scans into the model's space (no MONAI import)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from medvit.pipelines.errors import MedvitError

INTENSITY_PRESETS = ("ct", "mr", "none")


@dataclass
class Preprocessing:
    """How scans are brought to the model's space; stored in every checkpoint.

    Attributes:
        spacing: Target voxel size in mm (RAS axes x, y, z); None keeps each scan's own.
        intensity: `ct` (clip the HU window and scale to 0..1), `mr` (z-score over the
            non-zero voxels) or `none`.
        ct_window: HU window of the `ct` preset.
        orientation: Axis codes the volumes are reoriented to.
    """

    spacing: tuple[float, float, float] | None = (1.5, 1.5, 2.0)
    intensity: str = "ct"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    orientation: str = "RAS"

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_PRESETS:
            raise MedvitError(f"intensity preset must be one of {INTENSITY_PRESETS}, got {self.intensity!r}")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise MedvitError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        self.ct_window = tuple(float(v) for v in self.ct_window)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        known = {k: d[k] for k in ("spacing", "intensity", "ct_window", "orientation") if k in d}
        return cls(**known)
