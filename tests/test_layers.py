"""fasttrain's import graph, drawn from the source: every import at any depth of a file (function-level imports
included, ``if TYPE_CHECKING:`` ones too), with no circle and no arrow from a floor to one above it. The floors
are ARCHITECTURE.md's "Layers"; a new module must be given one here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fasttrain"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "ground",  # knows no data, model or task; config and registry are torch-free
        (
            "fasttrain",  # the front door: its verbs are imported by name when first used, never by an import line
            "fasttrain.registry",
            "fasttrain.numbers",
            "fasttrain.config",
            "fasttrain.io",
            "fasttrain.budget",
            "fasttrain.memory",
            "fasttrain.stop",
            "fasttrain.rundir",
            "fasttrain.plot",
            "fasttrain.distributed",
            "fasttrain.agree",
            "fasttrain.timing",
            "fasttrain.ema",
            "fasttrain.step",
            "fasttrain.timm_support",
            "fasttrain.metrics",
            "fasttrain.checkpoint",
        ),
    ),
    ("data", ("fasttrain.data",)),
    ("models", ("fasttrain.models", "fasttrain.runtime", "fasttrain.optim")),
    ("tasks", ("fasttrain.tasks",)),
    (
        "runs",
        (
            "fasttrain.prepare",
            "fasttrain.monitor",
            "fasttrain.engine",
            "fasttrain.prediction",
            "fasttrain.benchmark",
            "fasttrain.lr_find",
            "fasttrain.tuning",
        ),
    ),
    ("cli", ("fasttrain.cli", "fasttrain.__main__")),
]

ALLOWED: set[tuple[str, str]] = set()
"""(importer, imported) pairs allowed to point upward, each with its reason; none today."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The fasttrain modules ``path`` imports anywhere in the file (``from fasttrain.x import y`` is the module
    ``fasttrain.x.y`` where that is one, else ``fasttrain.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("fasttrain"):
            module = node.module or ""
            out |= {f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fasttrain"}
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; fasttrain spells its imports out")
    return {m for m in out if m in MODULES}


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


def _layer(module: str) -> int:
    """The floor of ``module``: the longest prefix named in LAYERS wins (``fasttrain`` alone is the front door)."""
    best, floor = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "fasttrain" and module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, floor = len(prefix), i
    if floor < 0:
        raise AssertionError(f"{module} has no floor: add it to LAYERS (and ARCHITECTURE.md's Layers)")
    return floor


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d, path + [d])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_every_module_has_a_floor():
    for m in MODULES:
        _layer(m)


def test_no_module_imports_from_a_floor_above_its_own():
    upward = [
        f"{m} ({LAYERS[_layer(m)][0]}) -> {d} ({LAYERS[_layer(d)][0]})"
        for m, deps in sorted(GRAPH.items())
        for d in sorted(deps)
        if _layer(d) > _layer(m) and (m, d) not in ALLOWED
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_import_graph_has_no_circle():
    found = _cycle(GRAPH)
    assert found is None, "import circle: " + " -> ".join(found or [])


def test_the_check_finds_a_circle_and_an_upward_arrow():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert _layer("fasttrain.engine") > _layer("fasttrain.tasks.base") > _layer("fasttrain.config")
    with pytest.raises(AssertionError, match="has no floor"):
        _layer("fasttrain.nowhere")


# -- function length ----------------------------------------------------------------------------------------------
MAX_FUNCTION_LINES = 100


def _long_functions(under: Path) -> list[str]:
    """Functions (methods, nested ones) of more than MAX_FUNCTION_LINES lines, from ``def`` to their last line."""
    found = []
    for path in sorted(under.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_fasttrain_is_over_100_lines():
    assert not _long_functions(PKG), _long_functions(PKG)
