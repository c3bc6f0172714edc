"""No import cycles in ``nodes/`` and ``core/``: every module's imports (module level and inside functions,
relative ones resolved) are read with ``ast``, and the import graph must have no cycle.  A package's
``__init__`` counts as a module of its own: ``from .config import X`` inside ``nodes/todo/`` imports
``nodes.todo.config``, not the package.  Needs no ComfyUI."""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOTS = ("nodes", "core")


def module_files() -> dict:
    """{dotted module name: path} of every module under the roots ("nodes.todo" is nodes/todo/__init__.py)."""
    out = {}
    for root in ROOTS:
        for folder, dirs, files in os.walk(os.path.join(REPO, root)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1]
                    out[".".join(rel)] = os.path.join(folder, f)
    return out


def imports_of(name: str, path: str, known: set) -> set:
    """The modules under the roots that ``name`` imports anywhere in its file."""
    is_package = os.path.basename(path) == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()

    def add(target: str) -> None:
        while target and target not in known:          # a name inside a module: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name.removeprefix("comfyui_freespeed."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = (node.module or "").removeprefix("comfyui_freespeed.")
            if mod not in known and not any(mod.startswith(r + ".") or mod == r for r in ROOTS):
                continue                               # torch, comfy, ...
            for alias in node.names:                   # `from . import x`: the submodule x when there is one
                sub = f"{mod}.{alias.name}"
                add(sub if sub in known else mod)
    return out


def import_graph() -> dict:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def find_cycle(graph: dict):
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_graph_sees_the_technique_packages():
    graph = import_graph()
    assert "nodes.todo.dit" in graph and "nodes.todo.config" in graph["nodes.todo.dit"]
    assert "nodes.sites" in graph["nodes.todo.node"] and "core.tokens" in graph["nodes.todo.config"]


def test_no_import_cycle_in_nodes_and_core():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_core_imports_nothing_from_nodes():
    graph = import_graph()
    bad = sorted(f"{a} -> {b}" for a, deps in graph.items() if a.startswith("core") for b in deps
                 if b.startswith("nodes"))
    assert not bad, bad


@pytest.mark.parametrize("source, expect", [
    ("from .b import x\n", ["pkg.a", "pkg.b", "pkg.a"]),                   # module level
    ("def f():\n    from . import b\n", ["pkg.a", "pkg.b", "pkg.a"]),     # lazy, `from . import module`
])
def test_a_cycle_is_found_and_named(tmp_path, source, expect):
    """The detector itself: a -> b -> a through a module-level or a lazy import is reported, named."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text(source)
    (tmp_path / "pkg" / "b.py").write_text("from ..pkg.a import y\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    graph = {n: imports_of(n, str(tmp_path / (n.replace(".", "/") + ("/__init__.py" if n == "pkg" else ".py"))), known)
             for n in known}
    assert find_cycle(graph) == expect
