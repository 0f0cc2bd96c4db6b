"""Model registry: variants are small functions registered under timm-style names."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_TINY: dict[str, dict[str, Any]] = {}


def register_model(
    fn: Callable[..., nn.Module] | None = None, *, tiny: dict[str, Any] | None = None
) -> Any:
    """Register a variant function under its own name.

    Args:
        fn: The variant function; it takes keyword overrides and returns the model.
        tiny: Overrides that shrink the variant to a few-second CPU configuration
            (used by the registry tests and smoke checks, never by users' models).
    """

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = f.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = f
        _TINY[name] = dict(tiny or {})
        return f

    return wrap(fn) if fn is not None else wrap


KINDS = ("image", "video", "volume")


def model_kind(name: str) -> str:
    """`image`, `video` or `volume`: the `medvit.models` sub-package the variant lives in."""
    _check_name(name)
    parts = _MODELS[name].__module__.split(".")
    return next((p for p in parts if p in KINDS), "other")


def register_variant(cls: Callable[..., nn.Module], name: str, tiny: dict[str, Any] | None, **cfg: Any) -> None:
    """Register `name` as `cls` with defaults `cfg`, overridable per `create_model` call.

    Args:
        cls: The model class (or builder) of the family.
        name: The variant's registered name.
        tiny: Overrides for the registry tests (see `register_model`).
        **cfg: The variant's configuration.
    """

    def build(**overrides: Any) -> nn.Module:
        return cls(**{**cfg, **overrides})

    build.__name__ = build.__qualname__ = name
    build.__module__ = getattr(cls, "__module__", build.__module__)
    build.__doc__ = f"{name}: " + ", ".join(f"{k}={v}" for k, v in cfg.items())
    register_model(build, tiny=tiny)


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern (and kind), sorted."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = (n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))
    return sorted(n for n in names if kind is None or model_kind(n) == kind)


def is_model(name: str) -> bool:
    return name in _MODELS


def tiny_overrides(name: str) -> dict[str, Any]:
    """The small test configuration of a registered variant."""
    _check_name(name)
    return dict(_TINY[name])


def _check_name(name: str) -> None:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.5)
        hint = f"; closest registered names: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model name {name!r}{hint}")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: A registered variant name (see `list_models`).
        **overrides: Constructor arguments replacing the variant's defaults
            (`num_classes`, `in_chans`, `img_size`, ...).

    Returns:
        The model, with `model_name` and `model_args` attributes recording how to rebuild it.

    Raises:
        ValueError: The name is not registered, or an override is invalid.
    """
    _check_name(name)
    try:
        model = _MODELS[name](**overrides)
    except TypeError as e:
        raise ValueError(f"invalid arguments for model {name!r}: {e}") from None
    model.model_name = name
    model.model_args = dict(overrides)
    return model
