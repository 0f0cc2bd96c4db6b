"""Video backbones, input (B, C, T, H, W); importing this package registers every variant.

Each model family is one module here; all of them are imported, so a new family only
adds a file.
"""

from __future__ import annotations

import importlib
import pkgutil

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")
