"""User-facing errors: a one-line message naming the file and what is wrong.

The CLI turns these into `Error: <message>` and a non-zero exit, never a traceback.
"""

from __future__ import annotations


class MedvitError(ValueError):
    """A problem the user can fix (bad file, bad argument); str() is one line."""


class CheckpointError(MedvitError):
    """A checkpoint that is missing, not a medvit safetensors file, or does not fit."""


class DatasetError(MedvitError):
    """A dataset folder or dataset.json that cannot be used."""
