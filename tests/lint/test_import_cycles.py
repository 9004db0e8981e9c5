"""The kvmd package has no import cycles.

Builds the graph of imports between kvmd modules from the source (an ``ast`` parse of every
module, so imports inside functions and under ``if TYPE_CHECKING:`` count as much as those at
the top) and fails on any strongly connected component of more than one module, or a module
that imports itself. Layers import one way only (api -> core -> kvm; in kvm/ system -> vm ->
vcpu, as rust-vmm kvm-ioctls), and a function-level import is no way around that.

An import of a package's submodule is an edge to that submodule; ``from pkg import name``
where ``pkg.name`` is a module is an edge to the module, otherwise to ``pkg`` (its
``__init__``). Modules with no source here (the stdlib, the compiled cffi module) are no
edge. The implicit import of a parent package is not an edge: ``kvmd.kvm.vm`` is
free to be re-exported by ``kvmd/kvm/__init__.py``.

Run it alone: ``.venv/bin/python tests/lint/test_import_cycles.py`` prints every cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "kvmd"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    modules: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            # What is not a source module of the package (the stdlib, cffi, the compiled
            # kvmd.kvm._kvm_cffi) is no edge.
            edges.update(target for target in targets if target in modules)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                visit(node)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found, key=lambda c: (-len(c), c))


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    lines = [" <-> ".join(component)]
    for name in component:
        inside = sorted(graph[name] & members)
        if inside:
            lines.append(f"  {name} imports {', '.join(inside)}")
    return "\n".join(lines)


# A small package written out, to show the graph and the cycle finder see what they must.
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "from pkg.b import B\nclass A: ...\n",
        "pkg/b.py": "class B:\n    def f(self):\n        from pkg import a\n        return a\n",
        "pkg/c.py": "import pkg.a\n",
    })
    graph = import_graph(module_files(tmp_path, "pkg"))
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_finds_a_cycle_under_type_checking_and_relative(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from .x import X\n",
        "pkg/sub/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from ..y import Y\nclass X: ...\n",
        "pkg/y.py": "from pkg.sub import X\n",
    })
    graph = import_graph(module_files(tmp_path, "pkg"))
    assert graph["pkg.sub"] == {"pkg.sub.x"}
    assert graph["pkg.sub.x"] == {"pkg.y"}
    assert cycles(graph) == [["pkg.sub", "pkg.sub.x", "pkg.y"]]


def test_a_package_re_exporting_its_modules_is_no_cycle(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\nfrom pkg.b import B\n",
        "pkg/a.py": "from pkg.b import B\nclass A: ...\n",
        "pkg/b.py": "class B: ...\n",
    })
    assert cycles(import_graph(module_files(tmp_path, "pkg"))) == []


def test_kvmd_has_no_import_cycles() -> None:
    graph = import_graph(module_files())
    assert "kvmd.kvm.vm" in graph and "kvmd.core.vcpu" in graph
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(c, graph) for c in found)


if __name__ == "__main__":
    _graph = import_graph(module_files())
    for _component in cycles(_graph):
        print(describe(_component, _graph))
