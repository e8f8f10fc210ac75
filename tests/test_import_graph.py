"""No import cycle anywhere in the package, counting lazy imports inside functions too.

A cycle hidden by a lazy import still means two modules that cannot be understood (or loaded) one
without the other; the graph is read from the source with `ast`, relative imports and absolute
`livecache.` ones alike, so a function-level import counts exactly like a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "web", "workflows", "scripts", "build", "dist", "__pycache__"}


def package_modules(root: Path) -> dict[str, Path]:
    """Dotted module name (relative to the package root; '' is the root `__init__`) -> file."""
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP or part.startswith(".") or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports, wherever in the file the import statement sits."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found: set[str] = set()

    def add(target: list[str], names: list[str]) -> None:
        base = ".".join(target)
        for alias in names:  # `from pkg import module` imports the submodule
            sub = f"{base}.{alias}" if base else alias
            if sub in modules:
                found.add(sub)
        if base in modules:
            found.add(base)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "livecache":
                    add(parts[1:], [])
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level:
                up = node.level - 1
                if up > len(package):
                    continue
                target = package[: len(package) - up] + (node.module.split(".") if node.module else [])
                add(target, names)
            elif node.module and node.module.split(".")[0] == "livecache":
                add(node.module.split(".")[1:], names)
    found.discard(name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_package_has_no_import_cycle():
    graph = import_graph(ROOT)
    assert "adapters.diffusers_site" in graph and "accel.registry" in graph  # the graph covers the package
    assert "adapters.diffusers_unet" in graph["adapters.diffusers_quant"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_graph_sees_lazy_relative_and_absolute_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (tmp_path / "pkg" / "b.py").write_text("import livecache.c\n")
    (tmp_path / "c.py").write_text("from .pkg import a\n")
    graph = import_graph(tmp_path)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"c"} and graph["c"] == {"pkg", "pkg.a"}
    assert find_cycle(graph) == ["c", "pkg.a", "pkg.b", "c"]
