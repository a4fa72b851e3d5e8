"""The package's shape (docs/architecture.md): layers import only downward, tools stay on top, modules stay small.

Static: every ``import`` of every module under ``src/mr2ct`` (function-level ones included) is read with
``ast`` and checked against the layer table below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mr2ct"

#: bottom to top; a module belongs to the layer of its longest listed prefix
LAYERS: list[tuple[str, ...]] = [
    ("errors", "monai_import"),
    ("config",),
    ("formats", "numerics", "deploy"),
    ("nets",),
    ("losses",),
    ("checkpoints",),
    ("evaluation",),
    ("data",),
    ("inference",),
    ("model",),
    ("training",),
    ("profiling",),  # measures steps as mr2ct.train runs them (the numerics trial included)
]
#: command-line tools: ``python -m mr2ct.<tool>``; nothing below them may import them
TOOLS = ("cli", "train", "translate", "evaluate", "segment", "augment", "split", "leakcheck", "plan", "export")
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """Layer index of a module path relative to the package (``data.phantom.anatomy``); tools are on top."""
    if module.split(".")[0] in TOOLS:
        return len(LAYERS)
    best = None
    for i, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > best[1]:
                    best = (i, len(name))
    if best is None:
        raise AssertionError(f"mr2ct.{module} is in no layer of tests/test_architecture.py: place it (and in docs/architecture.md)")
    return best[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module relative to the package) for every mr2ct import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "mr2ct":
            base = node.module[len("mr2ct"):].lstrip(".")
            # `from mr2ct import model` names modules; `from mr2ct.x import y` names module x
            out += [(node.lineno, a.name) for a in node.names] if not base else [(node.lineno, base)]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("mr2ct."):]) for a in node.names if a.name.startswith("mr2ct.")]
    return out


MODULES = sorted(SRC.rglob("*.py"))


def test_every_import_runs_downward_and_no_library_module_imports_a_tool():
    bad = []
    for path in MODULES:
        me = _module(path)
        if not me:
            continue
        mine = _layer(me)
        for line, other in _imports(path):
            theirs = _layer(other)
            same_package = other.split(".")[0] == me.split(".")[0]
            if theirs > mine or (theirs == mine and not same_package and mine < len(LAYERS)):
                bad.append(f"src/mr2ct/{path.relative_to(SRC)}:{line}: mr2ct.{me} (layer {mine}) imports mr2ct.{other} (layer {theirs})")
    assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(SRC)): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


@pytest.mark.parametrize("source, expected", [
    ("from mr2ct.translate import run\n", "translate"),
    ("from mr2ct import model\n", "model"),
    ("import mr2ct.data.phantom as p\n", "data.phantom"),
])
def test_the_checker_sees_every_form_of_import(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert [m for _, m in _imports(path)] == [expected]
