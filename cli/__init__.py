"""The `medvit` command line: click commands that parse, call a pipeline and print."""

from __future__ import annotations
