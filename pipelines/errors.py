"""User-facing errors: a one-line message naming the file and what is wrong.

The CLI turns these into `Error: <message>` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_MAX_REASON_CHARS = 160


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


class ScanError(MedvitError):
    """A user's input problem; ``str(e)`` is one line naming the file and what is wrong.

    A ``MedvitError``, hence a ``ValueError``: the CLI reports it as one line, no traceback.
    """

    @classmethod
    def at(cls, path: str | Path, problem: str) -> ScanError:
        """The error for `path`; library messages can span lines, a user error must not."""
        return cls(" ".join(f"{path}: {problem}".split()))


def short_reason(exc: BaseException) -> str:
    """A library exception as a short single line, for the tail of a user error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text
