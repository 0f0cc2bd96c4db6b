"""Shared CLI plumbing: user errors become one line and exit code 1."""

from __future__ import annotations

import functools
import json
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


def _parse_model_args(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    out = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def model_arg_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--model-arg",
        "model_args",
        multiple=True,
        callback=_parse_model_args,
        help="Extra model argument KEY=VALUE (VALUE as JSON), repeatable.",
    )
