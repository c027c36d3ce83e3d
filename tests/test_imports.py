"""The project's import graph: no cycles among its modules, and ``service`` never imports ``workers``.

Every ``.py`` file of ``models``, ``service`` and ``workers`` is parsed (nothing is imported) and
each import statement becomes an edge, wherever it stands: at module level or inside a function
or method, since a function-level import closes a cycle at run time just the same. Relative
imports are resolved against the importing module's package, and ``from pkg import name`` where
``pkg.name`` is a module counts as importing that module (as well as ``pkg``). Importing
``a.b.c`` is an edge to ``a.b.c`` only, not to its parent packages, whose ``__init__`` runs
first: counting those would report ``service.api`` -> ``service.api.routes.jobs`` ->
``service.api.deps`` as a cycle through ``service.api``, which Python resolves without harm.
``importlib.import_module("...")`` and ``__import__("...")`` with a literal name count too.

Imports inside ``if TYPE_CHECKING:`` never run, so the cycle check ignores them (annotations may
name each other). The ``service`` -> ``workers`` rule has no such exception: the API and the CLI
must not depend on the worker's code even for type checking. Module names held in strings for
other tools (Celery's ``include``, ``celery -A``) are not imports and are not seen here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "service", "workers")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module, absolute (may lie outside the project)
    line: int
    type_checking: bool  # inside ``if TYPE_CHECKING:``

    def where(self, root: Path, files: dict[str, Path]) -> str:
        return f"{files[self.source].relative_to(root)}:{self.line}"


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the packages."""
    files: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: set[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.type_checking = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.AST) -> None:
        self.found.append(Import(self.module, target, getattr(node, "lineno", 0), self.type_checking > 0))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            if node.level - 1 >= len(parts):
                raise ValueError(f"{self.module}: relative import beyond the top-level package")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        self._add(target, node)
        for alias in node.names:
            if f"{target}.{alias.name}" in self.modules:  # ``from pkg import submodule``
                self._add(f"{target}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def collect_imports(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, Path], list[Import]]:
    files = module_files(root, packages)
    modules = set(files)
    found: list[Import] = []
    for module, path in files.items():
        collector = _Collector(module, path.name == "__init__.py", modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found += collector.found
    return files, found


def _project_module(target: str, modules: set[str]) -> str | None:
    """The project module an import runs: ``target`` itself, or None outside the project."""
    return target if target in modules else None


def find_cycles(files: dict[str, Path], imports: list[Import]) -> list[list[Import]]:
    """One cycle (as its edges) per strongly connected group of modules, ignoring TYPE_CHECKING imports."""
    modules = set(files)
    edges: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in imports:
        target = _project_module(imp.target, modules)
        if target is not None and not imp.type_checking:
            edges[imp.source].setdefault(target, imp)

    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    counter = 0
    for start in sorted(modules):
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(edges[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, todo = work[-1]
            if todo:
                nxt = todo.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in edges[node]:
                    groups.append(sorted(group))

    def shortest_cycle(first: str, members: set[str]) -> list[Import] | None:
        """The shortest way from ``first`` back to itself inside its group (breadth first)."""
        paths: dict[str, list[Import]] = {first: []}
        queue = [first]
        while queue:
            node = queue.pop(0)
            for nxt, imp in sorted(edges[node].items()):
                if nxt == first:
                    return [*paths[node], imp]
                if nxt in members and nxt not in paths:
                    paths[nxt] = [*paths[node], imp]
                    queue.append(nxt)
        return None

    cycles = []
    for group in groups:
        found = [c for c in (shortest_cycle(m, set(group)) for m in group) if c is not None]
        cycles.append(min(found, key=len))  # one per group: the shortest, to read first
    return cycles


def describe(cycle: list[Import], root: Path, files: dict[str, Path]) -> str:
    steps = [f"{imp.source} -> {imp.target} ({imp.where(root, files)})" for imp in cycle]
    return " -> ".join([cycle[0].source, *(imp.target for imp in cycle)]) + "\n    " + "\n    ".join(steps)


def forbidden(imports: list[Import], source: str, target: str) -> list[Import]:
    """Imports from package ``source`` into package ``target``, TYPE_CHECKING ones included."""

    def within(name: str, package: str) -> bool:
        return name == package or name.startswith(f"{package}.")

    return [imp for imp in imports if within(imp.source, source) and within(imp.target, target)]


def test_project_has_no_import_cycles() -> None:
    files, imports = collect_imports(ROOT, PACKAGES)
    assert {"models.training", "service.app", "workers.jobs"} <= set(files)
    cycles = find_cycles(files, imports)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, ROOT, files) for c in cycles)


def test_service_never_imports_workers() -> None:
    files, imports = collect_imports(ROOT, PACKAGES)
    bad = forbidden(imports, "service", "workers")
    assert not bad, "service imports workers:\n" + "\n".join(
        f"  {imp.where(ROOT, files)}: {imp.source} imports {imp.target}" for imp in bad
    )


# The checker itself, on small made-up packages.


def _tree(root: Path, sources: dict[str, str]) -> None:
    for name, text in sources.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _cycles(root: Path, packages: tuple[str, ...]) -> list[list[str]]:
    files, imports = collect_imports(root, packages)
    return [[imp.source for imp in cycle] for cycle in find_cycles(files, imports)]


def test_checker_sees_a_function_level_cycle_through_a_relative_import(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import thing\n",
        "pkg/b.py": "def thing():\n    from pkg import c\n",
        "pkg/c.py": "def later():\n    from . import a\n",
    })
    assert _cycles(tmp_path, ("pkg",)) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_checker_counts_from_package_import_submodule(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "",
        "pkg/sub/x.py": "from ..sub import y\n",
        "pkg/sub/y.py": "import importlib\n\ndef f():\n    importlib.import_module('pkg.sub.x')\n",
    })
    assert _cycles(tmp_path, ("pkg",)) == [["pkg.sub.x", "pkg.sub.y"]]


def test_checker_ignores_type_checking_cycles_but_not_forbidden_imports(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "svc/__init__.py": "",
        "svc/a.py": "from typing import TYPE_CHECKING\n\n"
        "if TYPE_CHECKING:\n    from svc.b import B\n    import wrk.t\n",
        "svc/b.py": "from svc import a\n",
        "wrk/__init__.py": "",
        "wrk/t.py": "import svc.a\n",
    })
    assert _cycles(tmp_path, ("svc", "wrk")) == []
    files, imports = collect_imports(tmp_path, ("svc", "wrk"))
    assert [(i.source, i.target) for i in forbidden(imports, "svc", "wrk")] == [("svc.a", "wrk.t")]


@pytest.mark.parametrize("module", ["service.app", "service.cli", "service.queue"])
def test_service_entry_points_stay_torch_free(module: str) -> None:
    """The API and CLI import neither torch nor the worker's code when they load."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'workers')); "
        "print(bad); sys.exit(bool(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
