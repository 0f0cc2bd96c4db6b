"""Every module the code and the tests import is declared.

A module imported anywhere under `medvit/`, `pipelines/`, `cli/`, `tests/`, `benchmarks/` or
`sample_data/` (at the top of a file, inside a function, or by name through
`pytest.importorskip` / `importlib.import_module`) must be in the standard library, the
project itself, or installed by a dependency declared in `pyproject.toml` (runtime or an
extra) or by a dependency of one. A package installed by hand on one machine must not make
the tests pass there and fail on a fresh one.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("medvit", "pipelines", "cli", "tests", "benchmarks", "sample_data")
PROJECT = {"medvit"}
# Functions whose first string argument names a module they import (`require` is the
# tests' own importorskip that fails under MEDVIT_TEST_STRICT=1).
IMPORTING_CALLS = {"importorskip", "import_module", "optional_import", "require"}
# Folders whose modules the tests import by putting the folder on sys.path.
SCRIPT_FOLDERS = ("tests", "benchmarks")


def _imported(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(top-level module name, line) of every absolute import in a parsed file."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], node.lineno
        elif isinstance(node, ast.Call) and node.args:
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            arg = node.args[0]
            if name in IMPORTING_CALLS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value.split(".")[0], node.lineno


def _local_modules(folder: Path) -> set[str]:
    """Modules a script or test in `folder` reaches through its own folder on sys.path."""
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").exists()}


def _declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def _installed_closure(reqs: list[Requirement]) -> tuple[set[str], list[str]]:
    """Canonical names of the declared distributions and all they require; and the missing ones."""
    seen: set[str] = set()
    missing: list[str] = []
    todo = [(r, set(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        key = canonicalize_name(req.name)
        if key in seen:
            continue
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            missing.append(str(req))
            continue
        seen.add(key)
        for raw in dist.requires or []:
            sub = Requirement(raw)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
                todo.append((sub, set(sub.extras)))
    return seen, missing


def _module_owners() -> dict[str, set[str]]:
    """Top-level module name -> canonical names of the installed distributions providing it."""
    return {mod: {canonicalize_name(d) for d in dists} for mod, dists in md.packages_distributions().items()}


def _python_files() -> list[Path]:
    files = [p for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    return [p for p in files if "__pycache__" not in p.parts]


def test_the_scan_covers_the_code_and_the_tests() -> None:
    files = _python_files()
    folders = {p.relative_to(ROOT).parts[0] for p in files}
    assert {"medvit", "pipelines", "cli", "tests"} <= folders
    modules = {m for p in files for m, _ in _imported(ast.parse(p.read_text(), str(p)))}
    # the scan sees imports at the top, inside functions and through importorskip
    assert {"torch", "numpy", "monai", "click", "pytest", "timm", "nibabel"} <= modules


def test_every_declared_dependency_is_installed() -> None:
    _, missing = _installed_closure(_declared_requirements())
    assert not missing, f"declared in pyproject.toml but not installed here: {missing}"


def test_every_imported_module_is_stdlib_project_or_declared() -> None:
    allowed, _ = _installed_closure(_declared_requirements())
    owners = _module_owners()
    stdlib = set(sys.stdlib_module_names)
    undeclared = []
    for path in _python_files():
        local = _local_modules(path.parent).union(*(_local_modules(ROOT / f) for f in SCRIPT_FOLDERS))
        for module, line in _imported(ast.parse(path.read_text(), str(path))):
            if module in stdlib or module in PROJECT or module in local or module == "__future__":
                continue
            if not owners.get(module, set()) & allowed:
                where = ", ".join(sorted(owners.get(module, set()))) or "not installed"
                undeclared.append(f"{path.relative_to(ROOT)}:{line}: {module} ({where})")
    assert not undeclared, "imported but not a declared dependency:\n" + "\n".join(undeclared)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("import a.b\nfrom c.d import e\nfrom . import f\n", {"a", "c"}),
        ("def g():\n    import h\n    pytest.importorskip('i.j')\n    importlib.import_module('k')\n", {"h", "i", "k"}),
        ("timm = require('timm.layers')\n", {"timm"}),
    ],
)
def test_import_scan_finds_every_kind_of_import(source: str, expected: set[str]) -> None:
    assert {m for m, _ in _imported(ast.parse(source))} == expected


def test_an_undeclared_distribution_is_not_in_the_closure() -> None:
    allowed, _ = _installed_closure([Requirement("click>=8.1")])
    assert "click" in allowed and "torch" not in allowed
