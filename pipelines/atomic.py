"""Files written whole or not at all: a temporary name beside the target, then a rename.

A killed or failing writer leaves at most a hidden `.tmp-<hex>-<name>` file (removed on
any error or SIGTERM unwinding; only SIGKILL can leave one), never a half-written file
under the real name. The temporary name keeps the real suffix, since nibabel, SimpleITK
and Pillow pick the format from it.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
