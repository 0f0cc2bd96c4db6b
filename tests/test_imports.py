"""The three layers install into one namespace and import in the documented direction."""

from __future__ import annotations

import ast
from pathlib import Path

import medvit
import medvit.cli
import medvit.pipelines

REPO = Path(__file__).resolve().parents[1]


def test_three_layers_import() -> None:
    assert medvit.__version__
    assert Path(medvit.pipelines.__file__).parent.name == "pipelines"
    assert Path(medvit.cli.__file__).parent.name == "cli"
    assert "unetr_base" in medvit.list_models()


def _imports(folder: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_imports_only_go_down() -> None:
    forbidden_lib = ("monai", "click", "nibabel", "SimpleITK", "itk", "medvit.pipelines", "medvit.cli")
    lib = _imports("medvit")
    # the scan must have read the sources, or the checks below pass on nothing
    assert "torch" in lib
    assert not [n for n in lib if n.split(".")[0] in forbidden_lib or n.startswith(forbidden_lib[-2:])]
    pipes = _imports("pipelines")
    assert "monai" in {n.split(".")[0] for n in pipes}
    assert not [n for n in pipes if n.split(".")[0] == "click" or n.startswith("medvit.cli")]
