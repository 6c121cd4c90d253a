"""The shape of the library's code, read from its source with ``ast`` (nothing is imported): function lengths,
the import graph between its modules and its cycles, and function-local imports.

``python -m tests.architecture [package folder]`` prints the numbers (default: ``ptuning``); the architecture
test (tests/test_architecture.py) asserts on the same functions.

The import graph has an edge ``a -> b`` when module ``a`` imports ``b`` while ``a`` itself is being imported:
a statement at module level (also inside a module-level ``if`` / ``try``, not under ``if TYPE_CHECKING:``).
Importing ``pkg.sub.mod`` first runs ``pkg/__init__.py`` and ``pkg/sub/__init__.py``, so those packages are
edges too, except the importer's own packages (Python is already running them).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# third-party packages a function may import where it needs them: optional or slow to import, and needed only
# by one feature (ZeRO, the chat page, a tracker, quantization, the loss plot, progress bars)
OPTIONAL_HEAVY = ("deepspeed", "gradio", "wandb", "torchao", "matplotlib", "tqdm")
LONG_FUNCTION = 80  # lines: a function a reader can hold in their head


@dataclass(frozen=True)
class Function:
    name: str  # module.Class.function (nested functions: module.outer.inner)
    path: Path
    line: int
    lines: int  # from its ``def`` (decorators excluded) to its last line, nested functions included


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    path: Path
    line: int
    targets: tuple[str, ...]  # modules of the library it runs (packages included), or the top-level package
    internal: bool  # imports a module of the library
    local: bool  # inside a function (runs when called, not when the module is imported)
    type_checking: bool  # under ``if TYPE_CHECKING:`` (never runs)


def library_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package folder ``root``."""
    root = Path(root)
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def functions(modules: dict[str, Path]) -> list[Function]:
    """Every function and method of ``modules``, longest first."""
    found: list[Function] = []
    for name, path in modules.items():
        _collect_functions(ast.parse(path.read_text(encoding="utf-8"), str(path)), name, path, found)
    return sorted(found, key=lambda f: (-f.lines, f.name))


def _collect_functions(node: ast.AST, scope: str, path: Path, found: list[Function]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            qual = f"{scope}.{child.name}"
            found.append(Function(qual, path, child.lineno, child.end_lineno - child.lineno + 1))
            _collect_functions(child, qual, path, found)
        elif isinstance(child, ast.ClassDef):
            _collect_functions(child, f"{scope}.{child.name}", path, found)
        else:
            _collect_functions(child, scope, path, found)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _with_packages(target: str, importer: str, modules: dict[str, Path]) -> tuple[str, ...]:
    """``target`` and the packages above it that importing it runs (not the importer's own)."""
    parts = target.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    own = {".".join(importer.split(".")[: i + 1]) for i in range(importer.count(".") + 1)}
    return tuple(n for n in names if n in modules and n not in own and n != importer)


def imports(modules: dict[str, Path]) -> list[Import]:
    """Every import statement of ``modules``."""
    found: list[Import] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, local, type_checking in _import_nodes(tree, False, False):
            found.append(_import(modules, name, path, node, local, type_checking))
    return found


def _import_nodes(node: ast.AST, local: bool, type_checking: bool):
    """``(statement, local, type_checking)`` for each import statement under ``node``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, local, type_checking
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _import_nodes(child, True, type_checking)
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), local, True)
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]), local, type_checking)
        else:
            yield from _import_nodes(child, local, type_checking)


def _import(modules: dict[str, Path], importer: str, path: Path, node: ast.Import | ast.ImportFrom, local: bool,
            type_checking: bool) -> Import:
    package = next(iter(modules)).split(".")[0]
    if isinstance(node, ast.Import):
        absolute = [alias.name for alias in node.names]
    else:
        base = _resolve(importer, path.name == "__init__.py", node.level, node.module)
        # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
        absolute = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
    internal = absolute[0].split(".")[0] == package
    if internal:
        targets = tuple(dict.fromkeys(t for a in absolute for t in _with_packages(a, importer, modules)))
    else:
        targets = (absolute[0].split(".")[0],)
    return Import(importer, path, node.lineno, targets, internal, local, type_checking)


def import_graph(modules: dict[str, Path], *, with_local: bool = False) -> dict[str, set[str]]:
    """Module -> the library modules it imports when it is imported (``with_local``: also when its functions
    run, i.e. the graph that function-local imports hide)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for imp in imports(modules):
        if imp.internal and not imp.type_checking and (with_local or not imp.local):
            graph[imp.module].update(imp.targets)
    return graph


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the library's top-level parts (``ptuning.training``, ``ptuning.build`` ...)."""

    def part(name: str) -> str:
        return ".".join(name.split(".")[:2])

    collapsed: dict[str, set[str]] = defaultdict(set)
    for a, targets in graph.items():
        collapsed[part(a)]
        for b in targets:
            if part(b) != part(a) and "." in b:
                collapsed[part(a)].add(part(b))
    return dict(collapsed)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` that hold a cycle, each sorted (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def mutual_pairs(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """The pairs of nodes that import each other directly (the shortest cycles)."""
    return sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph.get(b, ()))


def local_imports(modules: dict[str, Path]) -> list[Import]:
    """Function-local imports (those under ``if TYPE_CHECKING:`` excluded)."""
    return [imp for imp in imports(modules) if imp.local and not imp.type_checking]


def misplaced_local_imports(modules: dict[str, Path]) -> list[Import]:
    """Function-local imports of a library module, of the standard library or of a dependency that is not an
    optional heavy one (:data:`OPTIONAL_HEAVY`): each belongs at the top of its module."""
    return [imp for imp in local_imports(modules) if imp.internal or imp.targets[0] not in OPTIONAL_HEAVY]


def _where(imp: Import, root: Path) -> str:
    return f"{imp.path.relative_to(root.parent)}:{imp.line} {imp.module} imports {', '.join(imp.targets)}"


def report(root: Path) -> str:
    modules = library_modules(root)
    funcs = functions(modules)
    lines = [f"{root}: {len(modules)} modules, {sum(len(p.read_text().splitlines()) for p in modules.values())} lines"]
    lines.append(f"longest functions (over {LONG_FUNCTION} lines: {sum(f.lines > LONG_FUNCTION for f in funcs)}):")
    lines += [f"  {f.lines:4d}  {f.name}  ({f.path.relative_to(root.parent)}:{f.line})" for f in funcs[:10]]
    for title, graph in (
        ("import cycles between modules", import_graph(modules)),
        ("import cycles between modules, counting function-local imports", import_graph(modules, with_local=True)),
        ("import cycles between top-level parts", package_graph(import_graph(modules))),
        ("import cycles between top-level parts, counting function-local imports",
         package_graph(import_graph(modules, with_local=True))),
    ):
        found = cycles(graph)
        lines.append(f"{title}: {len(found)}")
        lines += [f"  {' <-> '.join(c)}" for c in found]
        pairs = mutual_pairs(graph)
        if pairs:
            lines.append(f"    of which importing each other directly: {', '.join(f'{a} <-> {b}' for a, b in pairs)}")
    local = local_imports(modules)
    misplaced = misplaced_local_imports(modules)
    lines.append(f"function-local imports: {len(local)} ({sum(i.internal for i in local)} of library modules, "
                 f"{len(local) - len(misplaced)} of optional heavy packages {', '.join(OPTIONAL_HEAVY)})")
    lines += [f"  {_where(i, root)}" for i in misplaced]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "ptuning")))
