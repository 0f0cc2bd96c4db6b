"""What a checkpoint records about bringing scans into the model's space (no MONAI import)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from medvit.pipelines.errors import MedvitError

INTENSITY_PRESETS = ("ct", "mr", "none", "ct-fingerprint")
# The defaults of training and conversion: voxel size in mm (RAS x, y, z), and the HU window
# of the `ct` preset (abdominal soft tissue).
DEFAULT_SPACING: tuple[float, float, float] = (1.5, 1.5, 2.0)
DEFAULT_CT_WINDOW: tuple[float, float] = (-175.0, 250.0)


def default_intensity(modality: str | None) -> str:
    """The intensity preset for a dataset's modality: `ct` for CT (or none given), `mr` for MR, else `none`."""
    name = (modality or "CT").upper()
    return "ct" if name == "CT" else "mr" if name in ("MR", "MRI") else "none"


@dataclass
class Preprocessing:
    """How scans are brought to the model's space; stored in every checkpoint.

    Attributes:
        spacing: Target voxel size in mm (RAS axes x, y, z); None keeps each scan's own.
        intensity: `ct` (clip the HU window and scale to 0..1), `ct-fingerprint` (clip to the
            training foreground's 0.5 / 99.5 percentiles and z-score with its mean and std,
            as nnU-Net normalises CT), `mr` (z-score over the non-zero voxels) or `none`.
        ct_window: HU window of the `ct` preset.
        orientation: Axis codes the volumes are reoriented to.
        ct_clip: `ct-fingerprint`: the HU range values are clipped to.
        ct_mean: `ct-fingerprint`: the foreground's mean HU.
        ct_std: `ct-fingerprint`: the foreground's HU standard deviation.
    """

    spacing: tuple[float, float, float] | None = DEFAULT_SPACING
    intensity: str = "ct"
    ct_window: tuple[float, float] = DEFAULT_CT_WINDOW
    orientation: str = "RAS"
    ct_clip: tuple[float, float] | None = None
    ct_mean: float | None = None
    ct_std: float | None = None

    def __post_init__(self) -> None:
        if self.intensity not in INTENSITY_PRESETS:
            raise MedvitError(f"intensity preset must be one of {INTENSITY_PRESETS}, got {self.intensity!r}")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise MedvitError(f"spacing must be three positive numbers (mm), got {self.spacing}")
        self.ct_window = tuple(float(v) for v in self.ct_window)  # type: ignore[assignment]
        if self.ct_clip is not None:
            self.ct_clip = tuple(float(v) for v in self.ct_clip)  # type: ignore[assignment]

    def ct_norm(self) -> tuple[float, float, float, float]:
        """`(low, high, mean, std)` of the `ct-fingerprint` preset.

        Raises:
            MedvitError: The statistics are missing (a fingerprint was never measured).
        """
        if self.ct_clip is None or self.ct_mean is None or self.ct_std is None:
            raise MedvitError("ct-fingerprint normalisation without its statistics (ct_clip, ct_mean, ct_std)")
        lo, hi = self.ct_clip
        return lo, hi, float(self.ct_mean), max(float(self.ct_std), 1e-8)

    def with_fingerprint(self, fingerprint: Mapping[str, Any]) -> Preprocessing:
        """This preprocessing with the `ct-fingerprint` statistics of a dataset fingerprint
        (`medvit.pipelines.fingerprint.compute_fingerprint`); unchanged for the other presets.

        Raises:
            MedvitError: The fingerprint has no foreground intensities.
        """
        if self.intensity != "ct-fingerprint":
            return self
        stats = fingerprint.get("intensity") or {}
        needed = ("percentile_00_5", "percentile_99_5", "mean", "std")
        if any(stats.get(k) is None for k in needed):
            raise MedvitError("ct-fingerprint normalisation needs foreground voxels: no label voxels in the training data")
        return replace(
            self, ct_clip=(stats["percentile_00_5"], stats["percentile_99_5"]), ct_mean=float(stats["mean"]),
            ct_std=float(stats["std"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields, leaving out the `ct-fingerprint` statistics when they are unset."""
        d = asdict(self)
        for k in ("ct_clip", "ct_mean", "ct_std"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preprocessing:
        keys = ("spacing", "intensity", "ct_window", "orientation", "ct_clip", "ct_mean", "ct_std")
        return cls(**{k: d[k] for k in keys if k in d})
