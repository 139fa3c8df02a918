"""The package's shape, as the README's layout describes it: no import cycle among prefrank's modules
(imports anywhere in a module: an import inside a function, made late to dodge a cycle, still closes
it) and no module over 500 lines."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "prefrank"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The prefrank modules `path` imports, at module level or inside a function: `from a import b`
    counts a.b when that is a module, else a; a package's __init__ is imported with any of its modules."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
                parent = name.rpartition(".")[0]
                while parent:  # importing a.b.c runs a and a.b first
                    found.add(parent)
                    parent = parent.rpartition(".")[0]
    return found


def test_no_import_cycle():
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    graph = {name: {m for m in deps if not (m.startswith(name + ".") and paths[name].name == "__init__.py")}
             for name, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports among them")
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_no_module_over_500_lines():
    sizes = {str(p.relative_to(PACKAGE.parent)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    print("largest:", sorted(sizes.items(), key=lambda kv: -kv[1])[:3])
    assert not {path: n for path, n in sizes.items() if n > 500}
