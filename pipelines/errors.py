"""User-facing errors: a one-line message naming the file and what is wrong.

The CLI turns these into `Error: <message>` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = [
    "CheckpointError", "DatasetError", "MedvitError", "Problem", "ScanError", "one_line", "short_reason",
]

_MAX_REASON_CHARS = 160
_E = TypeVar("_E", bound="MedvitError")


def one_line(text: str) -> str:
    """`text` with every run of whitespace (line breaks included) made one space."""
    return " ".join(text.split())


def short_reason(exc: BaseException) -> str:
    """A library exception as a short single line, for the tail of a user error."""
    text = one_line(str(exc)) or type(exc).__name__
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text


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


class MedvitError(ValueError):
    """A problem the user can fix (bad file, bad argument); str() is one line."""

    @classmethod
    def at(cls: type[_E], path: str | Path, problem: str) -> _E:
        """The error for `path`: `<path>: <problem>`, made one line (library messages can span lines)."""
        return cls(one_line(f"{path}: {problem}"))


class CheckpointError(MedvitError):
    """A checkpoint that is missing, not a medvit safetensors file, or does not fit."""


class DatasetError(MedvitError):
    """A dataset folder or dataset.json that cannot be used.

    Attributes:
        problem: The same as a :class:`Problem`, when the error is about one file
            (made by :meth:`at`); checks that list every problem report it as is.
    """

    problem: Problem | None = None

    @classmethod
    def at(cls, path: str | Path, problem: str) -> DatasetError:
        error = super().at(path, problem)
        error.problem = Problem(Path(path), one_line(problem))
        return error


class ScanError(MedvitError):
    """A user's input problem; ``str(e)`` is one line naming the file and what is wrong.

    A ``MedvitError``, hence a ``ValueError``: the CLI reports it as one line, no traceback.
    """
