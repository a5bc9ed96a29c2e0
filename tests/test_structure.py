"""The shape of the code: engine/'s imports (function-level ones included) form no cycle, only the entry points
import the pipeline, and no module imports another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str = "engine") -> dict[str, Path]:
    out = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) of every import statement in `path`, anywhere in it; a name
    that is a submodule counts as that module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name:
                    found.append((name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.append((f"{base}.{alias.name}", [], node.lineno))
                elif base in known:
                    found.append((base, [alias.name], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: {target for target, _, _ in _imports(m, p, known)} - {m} for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle or several."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_engine_has_no_import_cycle():
    graph = _graph()
    assert "engine.pipeline" in graph["engine.cli"]  # function-level imports are seen
    cycles = _cycles(graph)
    detail = "\n".join(" -> ".join(c) + "\n  " + "\n  ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
                       for c in cycles)
    assert not cycles, f"import cycles in engine/:\n{detail}"


def test_only_the_entry_points_import_the_pipeline():
    known = {**_modules("engine"), **_modules("jobs")}
    importers = sorted(m for m, p in known.items() if m != "engine.pipeline"
                       and any(t == "engine.pipeline" for t, _, _ in _imports(m, p, known)))
    assert importers and all(m == "engine.cli" or m.startswith("jobs.") for m in importers), importers


def test_no_module_imports_private_names_of_another():
    known = {**_modules("engine"), **_modules("jobs")}
    private = [f"{p.relative_to(ROOT)}:{line} imports {name} from {target}"
               for m, p in known.items() for target, names, line in _imports(m, p, known)
               for name in names if name.startswith("_") and not name.startswith("__")]
    assert not private, "\n".join(private)
