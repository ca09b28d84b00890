"""The house is one-way: no file of src/tuneship needs a file that needs it back (imports inside functions count,
`if TYPE_CHECKING:` blocks do not), and only the drivers import the pipeline and the loop's cycle."""

import ast
from pathlib import Path

from tests.conftest import REPO
from tests.test_dependencies import parse_source

SRC = REPO / "src"
# Who may drive the pipeline (the torchtune rule: the library never imports the recipe), and who may run a cycle.
PIPELINE_IMPORTERS = {"tuneship.cli", "tuneship.loop.cycle"}
CYCLE_IMPORTERS = {"tuneship.loop.cli", "tuneship.loop.worker"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(tree: ast.Module, package: str) -> set[str]:
    """Every module (and `module.name`) an import statement names, outside TYPE_CHECKING blocks."""
    names: set[str] = set()
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if is_type_checking_block(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of src/tuneship it imports (a package's __init__ counts as a file of its own)."""
    paths = {module_name(p): p for p in sorted((SRC / "tuneship").rglob("*.py"))}
    graph = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names = imported_names(parse_source(path), package)
        graph[module] = {name for name in names if name in paths and name != module}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of two or more modules (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    found.append(sorted(members))
    return found


def test_circles_are_found_when_there_are_some():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert circles(graph) == [["a", "b", "c"]]
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import y\ndef f():\n    from . import z\n    from .w import v")
    assert imported_names(tree, "pkg.sub") == {"x", "pkg.sub", "pkg.sub.z", "pkg.sub.w", "pkg.sub.w.v"}


def test_no_file_needs_a_file_that_needs_it_back():
    assert circles(import_graph()) == []


def test_only_the_drivers_import_the_pipeline_and_the_cycle():
    graph = import_graph()
    assert {m for m, imports in graph.items() if "tuneship.pipeline" in imports} == PIPELINE_IMPORTERS
    assert {m for m, imports in graph.items() if "tuneship.loop.cycle" in imports} == CYCLE_IMPORTERS
