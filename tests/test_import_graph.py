"""The package's modules import each other one way: no import circles, lazy imports included."""

import ast
import pathlib

import gemma_scope_pz

PACKAGE_ROOT = pathlib.Path(gemma_scope_pz.__file__).parent
PACKAGE = PACKAGE_ROOT.name


def _module_names() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, module: str, is_package: bool, modules) -> set[str]:
    """Modules named by the import statements of ``tree`` (function-level ones too).

    ``from a import b`` names ``a.b`` when that is one of ``modules``, else ``a``; importing a
    submodule is not counted as depending on its parent package's ``__init__``.
    """
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                names.add(sub if sub in modules else base)
        stack.extend(ast.iter_child_nodes(node))
    return names


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (``from a import b`` counts ``a.b`` if a module)."""
    modules = _module_names()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = _imported(tree, name, path.name == "__init__.py", modules)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_cycle_finder_sees_lazy_and_relative_imports():
    tree = ast.parse(
        "from . import b\n"
        "def f():\n"
        "    from gemma_scope_pz.x import c\n"
        "if TYPE_CHECKING:\n"
        "    import gemma_scope_pz.d\n"
    )
    modules = {"gemma_scope_pz.x.b", "gemma_scope_pz.d"}
    names = _imported(tree, "gemma_scope_pz.x.a", False, modules)
    assert {"gemma_scope_pz.x.b", "gemma_scope_pz.x"} <= names  # c is a name in package x
    assert "gemma_scope_pz.d" not in names
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20  # the whole package was read
    cycles = find_cycles(graph)
    assert not cycles, "import circles: " + "; ".join(" ↔ ".join(c) for c in cycles)
