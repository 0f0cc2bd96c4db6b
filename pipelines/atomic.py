"""Files written whole or not at all: a temporary name beside the target, then a rename.

A killed or failing writer leaves at most a hidden `.tmp-<hex>-<name>` file (removed on
any error or SIGTERM unwinding; only SIGKILL can leave one), never a half-written file
under the real name. The temporary name keeps the real suffix, since nibabel, SimpleITK
and Pillow pick the format from it.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medvit.pipelines.errors import MedvitError


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` that ends like it (`.tmp-<hex>-<name>`)."""
    return path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")


def remove_temporaries(path: Path) -> None:
    """Remove the temporary files a killed writer of `path` left beside it (SIGKILL runs no clean-up)."""
    for tmp in path.parent.glob(f".tmp-*-{glob.escape(path.name)}"):
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)`, then rename `tmp` to `path`; `tmp` is removed if anything fails.

    Returns:
        `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """`payload` as indented JSON, atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8"))


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    """`rows` under a `columns` header, atomically; keys not in `columns` are left out.

    Raises:
        MedvitError: `path` is a folder or cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise MedvitError.at(path, "CSV output path is a folder")

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    try:
        return write_atomic(path, write)
    except OSError as e:
        raise MedvitError.at(path, f"cannot write CSV ({e.strerror or e})") from None
