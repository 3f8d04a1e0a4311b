"""The library's layering, checked from its source: no import cycles, no function too long to read.

An import cycle makes the import order matter and hides which module is the lower layer; a long
function hides its stages. Phantom generators (long lists of drawing steps) are exempt.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[2] / "MultiTaskSegLib"
MAX_FUNCTION_LINES = 80
#: The layers of the README's "Architecture" section, lowest first: a module imports from its own
#: layer or lower ones only.
LAYERS = {
    "core": ("errors", "tasks", "imageio", "geometry", "normalization", "preprocessing", "plausibility"),
    "networks": ("networks",),
    "inferers": ("inferers",),
    "methods": ("architectures", "sampling", "losses", "augmentation"),
    "models": ("model_files", "model_catalog", "ensembles"),
    "workflows": ("datasets", "training", "finetuning", "distributed", "inference", "postprocessing", "segments",
                  "evaluation",
                  "evaluate_run", "experiments", "learning_curve"),
    "applications": ("cli", "batch", "demo", "background", "overlay", "phantoms"),
    "slicer": ("mrml", "mrml_run"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_nodes(tree: ast.Module):
    """Every node outside function bodies (imports inside functions are deferred on purpose)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            pending.extend(ast.iter_child_nodes(node))


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Library modules ``path`` imports outside its functions (``TYPE_CHECKING`` blocks included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _module_level_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1]) if node.level else ""
            target = ".".join(part for part in (base, node.module or "") if part)
            found.update(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                         for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return (found & modules) - {name}


def import_cycles() -> list[list[str]]:
    paths = {_module_name(path): path for path in LIBRARY.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) for name, path in paths.items()}
    cycles, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycles.append(stack[stack.index(imported):] + [imported])
            elif imported not in state:
                visit(imported)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    return cycles


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else None
    return next((number for number, members in enumerate(LAYERS.values()) if top in members), None)


def test_every_module_imports_from_its_own_layer_or_below():
    paths = {_module_name(path): path for path in LIBRARY.rglob("*.py")}
    unplaced = sorted(name for name in paths if name != "MultiTaskSegLib" and _layer(name) is None)
    assert unplaced == [], "place these modules in a layer (here and in the README)"
    upward = [f"{name} -> {imported}" for name, path in paths.items() for imported in _imports(path, set(paths))
              if imported != "MultiTaskSegLib" and name != "MultiTaskSegLib" and _layer(imported) > _layer(name)]
    assert upward == []


def test_the_library_has_no_import_cycles():
    assert import_cycles() == []


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    """The check itself: two modules importing each other are reported."""
    package = tmp_path / "MultiTaskSegLib"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import other\n")
    monkeypatch.setattr(sys.modules[__name__], "LIBRARY", package)
    assert import_cycles() == [["MultiTaskSegLib.a", "MultiTaskSegLib.b", "MultiTaskSegLib.a"]]


def test_no_function_is_too_long_to_read():
    long = []
    for path in LIBRARY.rglob("*.py"):
        if "phantoms" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(LIBRARY.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], "split these by stage"
