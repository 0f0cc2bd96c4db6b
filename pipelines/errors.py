"""User-facing errors: a one-line message naming the file and what is wrong.

The CLI turns these into `Error: <message>` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

_MAX_REASON_CHARS = 160


class MedvitError(ValueError):
    """A problem the user can fix (bad file, bad argument); str() is one line."""


class CheckpointError(MedvitError):
    """A checkpoint that is missing, not a medvit safetensors file, or does not fit."""


class DatasetError(MedvitError):
    """A dataset folder or dataset.json that cannot be used."""


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
