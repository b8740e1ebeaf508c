"""No import circles inside ssl_cli/: every import counts, module-level or inside a function.

A circle says a concept sits in the wrong room; a local import that only dodges it at run time
still leaves the two modules leaning on each other, so the graph here reads every `import` in the
file, wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "ssl_cli"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_name(path: Path, root: Path) -> str:
    """`root/data/transforms.py` -> `ssl_cli.data.transforms`; a package's `__init__` -> the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that the module `name` imports, resolving relative imports.

    `from ssl_cli.data import transforms` names a module, `from ssl_cli.data.transforms import
    to_tensor` names a function of one; either way the edge goes to the deepest known module.
    """
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import mod` reaches pkg.mod, `from pkg.mod import fn` reaches pkg.mod.
            targets = [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _deepest_known(target, known)
            if resolved and resolved != name:
                found.add(resolved)
    return found


def _deepest_known(dotted: str | None, known: set[str]) -> str | None:
    while dotted:
        if dotted in known:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports, over every .py file under `root`."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    known = set(files)
    return {
        name: imported_modules(
            ast.parse(path.read_text(), filename=str(path)), name, path.name == "__init__.py", known
        )
        for name, path in files.items()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        # Iterative, so a deep chain of imports cannot hit the recursion limit.
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete path a -> b -> ... -> a inside `component`, for the failure message."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child in members and child not in parents:
                    parents[child] = node
                    next_frontier.append(child)
        frontier = next_frontier
    return component


def test_cycle_finder_names_a_circle_and_ignores_a_chain() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]


def test_graph_counts_local_and_relative_imports(tmp_path: Path) -> None:
    root = tmp_path / PACKAGE
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "sub" / "one.py").write_text("from .two import helper\n")
    (root / "sub" / "two.py").write_text(
        "def helper():\n    from ssl_cli.sub.one import thing\n    return thing\n"
    )
    (root / "top.py").write_text("from ssl_cli.sub import one\nimport ssl_cli.sub.two\n")
    graph = import_graph(root)
    assert graph["ssl_cli.sub.one"] == {"ssl_cli.sub.two"}
    assert graph["ssl_cli.sub.two"] == {"ssl_cli.sub.one"}
    assert graph["ssl_cli.top"] == {"ssl_cli.sub.one", "ssl_cli.sub.two"}
    assert circles(graph) == [["ssl_cli.sub.one", "ssl_cli.sub.two"]]


def test_no_import_circles_in_the_package() -> None:
    graph = import_graph()
    found = circles(graph)
    message = "; ".join(" -> ".join(one_cycle(graph, c)) for c in found)
    assert not found, f"import circles in {PACKAGE}/ (move the shared concept one floor down): {message}"
