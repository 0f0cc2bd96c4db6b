"""Shared CLI plumbing: user errors become one line and exit code 1."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click

from medvit.pipelines.errors import MedvitError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a `MedvitError` (bad input a user can fix) into `Error: ...` and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedvitError as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"{e.filename}: no such file or folder") from None

    return wrapper


def device_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="auto",
        show_default=True,
        help="auto picks CUDA when present, else CPU.",
    )
