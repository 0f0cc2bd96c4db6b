"""Shared CLI plumbing: user errors become one line and exit code 1."""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import click

from medvit.pipelines.errors import MedvitError, one_line


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a `MedvitError` (bad input a user can fix) into `Error: ...` and exit 1.

    An error with `details` (one line per problem) has them printed first.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedvitError as e:
            # An error about many files (a dataset, a batch) lists them above its summary.
            for line in getattr(e, "details", ()):
                click.echo(line, err=True)
            raise click.ClickException(one_line(str(e)) or type(e).__name__) from None
        except FileNotFoundError as e:
            raise click.ClickException(f"{e.filename}: no such file or folder") from None

    return wrapper


@contextlib.contextmanager
def terminate_unwinds() -> Iterator[None]:
    """Make SIGTERM end the command by unwinding the stack, exit status 143.

    Python's own reaction to SIGTERM ends the process on the spot, so no `finally` runs
    and a file being written stays behind under its temporary name; unwinding runs the
    writers' clean-up. (SIGKILL cannot be caught: a temporary file can stay then, but
    never a partial file under a real name.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _exit(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
