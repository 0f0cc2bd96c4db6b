"""Model registry: each variant is a function decorated with `@register_model`, named as timm names it.

A variant is written once, greppable by its name::

    @register_model
    def vit_base_patch16_224(**kwargs: Any) -> VisionTransformer:
        \"\"\"ViT-B/16 (Dosovitskiy et al., 2021).\"\"\"
        return VisionTransformer(**{**dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs})

Families are registered lazily. The catalogue of names is read from the family modules' source
(`medvit/models/{image,video,volume}/*.py`, the functions under a `@register_model` line), so
listing names imports neither torch nor any family; a family's module is imported when one of
its models is built or its class is asked for. This module imports nothing heavy.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

if TYPE_CHECKING:
    import torch.nn as nn

KINDS = ("image", "video", "volume")

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_MODELS_ROOT = Path(__file__).resolve().parent / "models"
# a variant is the function defined right under a `@register_model` line (the catalogue test
# checks that what this finds is exactly what importing every family registers)
_REGISTERED_DEF = re.compile(r"^@register_model[ \t]*\r?\n(?:@.*\r?\n)*def[ \t]+(\w+)", re.MULTILINE)


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant function under its own name (decorator).

    Args:
        fn: The variant function; it takes keyword overrides and returns the model.

    Raises:
        ValueError: Another function is registered under the same name.
    """
    name = fn.__name__
    known = _MODELS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"model {name!r} is registered twice ({known.__module__} and {fn.__module__})")
    _MODELS[name] = fn
    return fn


@functools.cache
def catalog() -> dict[str, str]:
    """Every variant name and the module that registers it, read from source without importing.

    Raises:
        RuntimeError: Two family modules register the same name.
    """
    found: dict[str, str] = {}
    for kind in KINDS:
        for path in sorted((_MODELS_ROOT / kind).glob("*.py")):
            module = f"medvit.models.{kind}.{path.stem}"
            for name in _REGISTERED_DEF.findall(path.read_text(encoding="utf-8")):
                if name in found:
                    raise RuntimeError(f"model {name!r} is registered in {found[name]} and {module}")
                found[name] = module
    return found


def model_kind(name: str) -> str:
    """`image`, `video` or `volume`: the `medvit.models` sub-package the variant lives in."""
    _check_name(name)
    return catalog()[name].split(".")[2]


def list_models(pattern: str = "*", kind: str | None = None) -> list[str]:
    """Registered model names matching a shell-style pattern (and kind), sorted; imports no family."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    names = (n for n in catalog() if fnmatch.fnmatchcase(n, pattern))
    return sorted(n for n in names if kind is None or model_kind(n) == kind)


def is_model(name: str) -> bool:
    return name in catalog()


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The variant function of a registered name, importing its family on first use."""
    _check_name(name)
    if name not in _MODELS:
        importlib.import_module(catalog()[name])
    if name not in _MODELS:
        raise RuntimeError(f"{catalog()[name]} did not register {name!r}")
    return _MODELS[name]


def import_all() -> dict[str, Callable[..., nn.Module]]:
    """Import every family; returns what they registered (name -> variant function)."""
    for module in sorted(set(catalog().values())):
        importlib.import_module(module)
    return dict(_MODELS)


def variant_accepts(name: str, argument: str) -> bool:
    """Whether a registered variant's class accepts the constructor argument `argument`.

    The class is the one the variant function names as its return type. It accepts the
    argument when its `__init__` names it, or passes `**kwargs` on to a base class that
    does. Imports the variant's family; builds nothing.

    Raises:
        ValueError: The name is not registered.
        TypeError: The variant function names no model class as its return type.
    """
    cls = get_type_hints(model_entrypoint(name)).get("return")
    if not isinstance(cls, type):
        raise TypeError(f"the variant function {name!r} names no model class as its return type")
    for base in cls.__mro__:
        if "__init__" not in vars(base):
            continue
        params = inspect.signature(base.__init__).parameters
        if argument in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _check_name(name: str) -> None:
    if name not in catalog():
        close = difflib.get_close_matches(name, list(catalog()), n=5, cutoff=0.5)
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
    build = model_entrypoint(name)
    try:
        model = build(**overrides)
    except TypeError as e:
        raise ValueError(f"invalid arguments for model {name!r}: {e}") from None
    model.model_name = name
    model.model_args = dict(overrides)
    return model
