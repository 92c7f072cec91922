"""The shape of the code: no import cycle anywhere in ``src/``, small modules.

The import graph is read from the source (``ast``), with imports inside functions and under
``TYPE_CHECKING`` included: an import hidden in a function still ties two modules together.
Built-in registry entries are ``module:attribute`` strings loaded on first use, as entry points
are, so they are not imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "trustpot"
MAX_LINES = 620


def module_names() -> dict[str, Path]:
    out = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the trustpot modules it imports (anywhere in its body)."""
    modules = module_names()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" for alias in node.names] + [source]
                # "from pkg import submodule" imports the submodule; otherwise the module itself
                targets = [t for t in targets[:-1] if t in modules] or [source]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    graph[name].add(resolved)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycle() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_hidden_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    # and the graph builder sees imports inside functions
    graph = import_graph()
    assert "trustpot.registry" in graph["trustpot.models.deepset_moe"]


def test_checkpoint_module_names_no_kind() -> None:
    """io/checkpoint dispatches through the registry; it imports no wrapper or mixture."""
    deps = import_graph()["trustpot.io.checkpoint"]
    assert not {d for d in deps if d.startswith(("trustpot.uq", "trustpot.bench"))}


def test_modules_are_small() -> None:
    big = {
        name: n
        for name, path in module_names().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_readme_layout_matches_the_tree() -> None:
    """The README's layout block names every module of ``src/trustpot`` and nothing else.

    Format of the block (under ``## Layout``): one line per package, ``  pkg/: a b c  # what``
    (``./:`` for the top level); ``#`` starts a comment.
    """
    readme = (SRC.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed: set[str] = set()
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        package, _, names = line.partition(":")
        prefix = "" if package.strip() == "./" else package.strip().rstrip("/") + "/"
        listed |= {prefix + name for name in names.split()}
    actual = {
        str(path.relative_to(SRC / PACKAGE).with_suffix(""))
        for path in (SRC / PACKAGE).rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert listed == actual, (
        f"README layout lists modules that do not exist: {sorted(listed - actual)}; "
        f"misses: {sorted(actual - listed)}"
    )
