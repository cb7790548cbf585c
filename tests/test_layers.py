"""The import graph of megapack/ follows the layer order: no cycles, and every import points to the importer's own
layer or a lower one. Reads the sources with `ast` (module-level and function-level imports, `import x` and
`from x import y`, relative imports resolved); imports nothing from megapack."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

# The layer order (issue 20), lowest first: (rank, layer, module prefixes). A module belongs to the layer of the
# longest prefix it matches; it may import its own layer or a lower rank. Layers of equal rank (training.run and
# training.memory) may not import each other.
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "base", ("megapack.errors", "megapack.atomic", "megapack.checksums", "megapack.seeds", "megapack.quiet",
                 "megapack.assets", "megapack.dirlock")),
    (1, "data.sources", ("megapack.data.sources",)),
    (2, "data.render", ("megapack.data.render",)),
    (3, "data.packs", ("megapack.data.packs",)),
    (4, "data.pipeline", ("megapack.data.pipeline",)),
    (5, "model", ("megapack.model",)),
    (6, "training.compat", ("megapack.training.compat",)),
    (7, "training.preflight", ("megapack.training.preflight",)),
    (8, "training.run", ("megapack.training.run",)),
    (8, "training.memory", ("megapack.training.memory",)),
    (9, "report", ("megapack.report",)),
    (9, "inference", ("megapack.inference",)),
    (9, "evaluation", ("megapack.evaluation",)),
    (10, "demo", ("megapack.demo", "megapack.demo_quality", "megapack.demo_runs")),
    (11, "cli", ("megapack.cli",)),
]
TOP = ("megapack", "megapack.__main__")  # the package itself and `python -m megapack`: above every layer

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megapack"


def module_name(path: Path) -> str:
    """Dotted module name of a file under megapack/ (a package's __init__.py is the package)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_files() -> dict[str, Path]:
    """Every module of megapack/ -> its file."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: set[str]) -> str | None:
    """The megapack module `name` refers to: itself, or the longest enclosing module (an imported attribute)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The megapack modules that `module` imports anywhere in its file (module level, functions, TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or an attribute of `base`
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    """megapack module -> the megapack modules it imports."""
    files = module_files()
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, layer) of a module; None when it matches no prefix (TOP modules rank above every layer)."""
    if module in TOP:
        return (LAYERS[-1][0] + 1, "top")
    best: tuple[int, tuple[int, str]] | None = None
    for rank, layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), (rank, layer))
    return best[1] if best else None


def _grouping_package(module: str) -> bool:
    """A package that only groups layers (megapack.data, megapack.training): an ancestor of some layer prefix."""
    return any(p.startswith(module + ".") for _, _, prefixes in LAYERS for p in prefixes)


def layer_problems(graph: dict[str, set[str]]) -> list[str]:
    """Modules in no layer, and imports against the layer order, one line each."""
    problems = []
    for module in sorted(graph):
        mine = layer_of(module)
        if mine is None:
            if not _grouping_package(module):
                problems.append(f"module {module} is in no layer")
            elif graph[module]:
                problems.append(f"{module} (a package grouping layers) imports {', '.join(sorted(graph[module]))}")
            continue
        for target in sorted(graph[module]):
            theirs = layer_of(target)
            if theirs is None:  # reported as a module in no layer (or a grouping package) on its own
                continue
            if theirs[1] != mine[1] and theirs[0] >= mine[0]:
                problems.append(f"{module} ({mine[1]}, rank {mine[0]}) imports {target} "
                                f"({theirs[1]}, rank {theirs[0]}): against the layer order")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-import), as a cycle through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm (the graph has a few hundred nodes: recursion is fine)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(_cycle_through(sorted(component), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One cycle a -> ... -> a inside a strongly connected component (breadth-first back to its first module)."""
    start, inside = component[0], set(component)
    paths = {w: [start, w] for w in sorted(graph[start]) if w in inside}
    frontier = list(paths)
    while start not in paths:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w in inside and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return paths[start]


def cycle_problems(graph: dict[str, set[str]]) -> list[str]:
    """Each import cycle as `a -> b -> a`."""
    out = []
    for cycle in cycles(graph):
        out.append("import cycle: " + " -> ".join(cycle))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles(graph):
    problems = cycle_problems(graph)
    assert not problems, "\n".join(problems)


def test_layer_order(graph):
    problems = layer_problems(graph)
    assert not problems, "\n".join(problems)


def test_assets_import_only_base(graph):
    base = LAYERS[0][2]
    above = sorted(t for t in graph["megapack.assets"] if not t.startswith(base))
    assert not above, f"megapack.assets imports {above}"


def test_data_imports_no_model_or_training(graph):
    bad = sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("megapack.data")
                 for t in targets if t.startswith(("megapack.model", "megapack.training")))
    assert not bad, "\n".join(bad)


def test_the_graph_sees_every_kind_of_import(graph):
    """Function-level, relative and `import x` forms are all edges (a checker that sees none would pass)."""
    assert "megapack.data.pipeline.encode" in graph["megapack.data.pipeline.preprocess"]  # inside a function
    assert "megapack.errors" in graph["megapack.data.packs.shards"]
    assert len(graph) > 50 and sum(map(len, graph.values())) > 100


def test_checker_reports_a_cycle():
    synthetic = {"megapack.data.render.a": {"megapack.data.render.b"},
                 "megapack.data.render.b": {"megapack.data.render.c"},
                 "megapack.data.render.c": {"megapack.data.render.a"},
                 "megapack.training.x": {"megapack.training.y"}, "megapack.training.y": {"megapack.training.x"}}
    assert cycle_problems(synthetic) == [
        "import cycle: megapack.data.render.a -> megapack.data.render.b -> megapack.data.render.c -> "
        "megapack.data.render.a", "import cycle: megapack.training.x -> megapack.training.y -> megapack.training.x"]


def test_checker_reports_imports_against_the_order_and_unknown_modules():
    synthetic = {
        "megapack.data.sources.formats": {"megapack.data.packs.shards", "megapack.errors"},  # upward: wrong
        "megapack.data.packs.shards": {"megapack.errors", "megapack.data.sources.formats"},  # downward: fine
        "megapack.training.run.loop": {"megapack.training.memory.estimate"},  # same rank, other layer: wrong
        "megapack.training.memory.estimate": set(),
        "megapack.errors": set(),
        "megapack.somewhere": set(),
        "megapack.data": {"megapack.errors"},
    }
    problems = layer_problems(synthetic)
    assert any(p.startswith("megapack.data.sources.formats (data.sources, rank 1) imports megapack.data.packs.shards")
               for p in problems)
    assert any(p.startswith("megapack.training.run.loop (training.run, rank 8) imports "
                            "megapack.training.memory.estimate") for p in problems)
    assert "module megapack.somewhere is in no layer" in problems
    assert any(p.startswith("megapack.data (a package grouping layers) imports") for p in problems)
    assert len(problems) == 4


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / "pkg.py"
    pkg.write_text("from . import shards\nfrom .shards import read_meta\nfrom .. import render\n"
                   "def f():\n    import megapack.errors\n")
    modules = {"megapack.data.packs.shards", "megapack.data.render", "megapack.errors", "megapack.data.packs.x"}
    assert imports_of("megapack.data.packs.x", pkg, modules) == {
        "megapack.data.packs.shards", "megapack.data.render", "megapack.errors"}
