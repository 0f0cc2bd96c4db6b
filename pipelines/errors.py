"""User-facing errors: a one-line message naming the file and what is wrong.

The CLI turns these into `Error: <message>` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class MedvitError(ValueError):
    """A problem the user can fix (bad file, bad argument); str() is one line."""


class CheckpointError(MedvitError):
    """A checkpoint that is missing, not a medvit safetensors file, or does not fit."""


class DatasetError(MedvitError):
    """A dataset folder or dataset.json that cannot be used."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file, for checks that list every problem instead of raising.

    Attributes:
        file: The file (or folder) at fault.
        message: What is wrong, one line, without the file name.
        warning: True for something that may be intended (the work can go on).
    """

    file: Path
    message: str
    warning: bool = False

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"
