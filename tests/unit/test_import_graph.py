"""The package's module graph has no cycle and no import that runs up the layers.

Every module of ``megatron_tppo`` is parsed with ``ast``; every import counts, those inside
functions (lazy) and under ``if TYPE_CHECKING`` included, as do ``importlib.import_module`` /
``__import__`` calls with a literal absolute name. Relative imports are resolved against the
importing module's package. ``from a.b import c`` counts as importing ``a.b.c`` when that is a
module, else ``a.b``; any other name resolves to the deepest module of the package it names. The
implicit import of a parent package (``import a.b.c`` runs ``a/__init__``) is not an edge.

What the third-party imports of the pure packages may be is checked in ``test_import_purity.py``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "megatron_tppo"

# The layers, lowest first. A module belongs to the layer whose prefix matches it longest (a
# prefix matches itself and its submodules; the root package matches only itself) and may import
# modules of its own layer or of lower ones.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # Leaves that import nothing of the package: the version, the weight-route rule (asked by
    # config validation, planning and the sync), console/logging, scalar logs, network facts and
    # the device switch.
    ("base", ("megatron_tppo", "megatron_tppo.weight_route", "megatron_tppo.console",
              "megatron_tppo.monitoring", "megatron_tppo.netinfo", "megatron_tppo.platform")),
    # The run's configuration and its file format.
    ("config", ("megatron_tppo.config", "megatron_tppo.config_io")),
    # Pure computation (no torch.distributed, megatron, vllm, ray): the loss maths and the window
    # pool; the datasets build the pool's prompts; the rewards score arithmetic tasks of data;
    # evaluation scores a policy with a reward it is given.
    ("algorithms", ("megatron_tppo.algorithms",)),
    ("data", ("megatron_tppo.data",)),
    ("rewards", ("megatron_tppo.rewards", "megatron_tppo.evaluation")),
    # Arithmetic over the config (layout, memory, time, the schedule; simulate runs the pool).
    ("planning", ("megatron_tppo.planning",)),
    # The model builders, the training engine on them, the weights (HF mapping, conversion from
    # training checkpoints, the transfer to the engines), the rollout engines receiving them.
    ("models", ("megatron_tppo.models",)),
    ("training", ("megatron_tppo.training",)),
    ("weights", ("megatron_tppo.weights",)),
    ("rollout", ("megatron_tppo.rollout",)),
    # The Ray controller that drives trainers and engines.
    ("controller", ("megatron_tppo.controller",)),
    # Entry points: ``python -m megatron_tppo.<name>``.
    ("entry points", ("megatron_tppo.train", "megatron_tppo.plan", "megatron_tppo.evaluate",
                      "megatron_tppo.smoke")),
]

# Upward edges (importer, imported) in modules that are being rewritten: being removed.
KNOWN: set[tuple[str, str]] = set()


def package_modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (its file, whether it is a package's ``__init__``)."""
    mods = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def _relative_base(module: str, is_pkg: bool, level: int) -> str:
    """The package a ``from`` import of ``level`` dots resolves against, inside ``module``."""
    parts = module.split(".") if is_pkg else module.split(".")[:-1]
    return ".".join(parts[:len(parts) - (level - 1)])


def imported_names(tree: ast.AST, module: str, is_pkg: bool) -> list[tuple[str, int]]:
    """Every absolute dotted name ``tree`` imports, with its line; ``from a import b`` gives ``a.b``
    (a module, or a name defined in ``a``: :func:`_resolve` tells)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _relative_base(module, is_pkg, node.level)
                base = f"{pkg}.{base}" if base else pkg
            names += [(base if alias.name == "*" else f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0].value
            if called in ("import_module", "__import__") and isinstance(arg, str) and not arg.startswith("."):
                names.append((arg, node.lineno))
    return names


def _resolve(name: str, modules) -> str | None:
    """The deepest module of the package that ``name`` names, or None outside the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def module_graph(root: Path, package: str) -> dict[str, dict[str, list[int]]]:
    """importer -> {imported module: lines}, restricted to modules of ``package``."""
    modules = package_modules(root, package)
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in modules}
    for mod, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, line in imported_names(tree, mod, is_pkg):
            if name != package and not name.startswith(package + "."):
                continue
            target = _resolve(name, modules)
            if target is None or target == mod:
                continue
            graph[mod].setdefault(target, [])
            if line not in graph[mod][target]:
                graph[mod][target].append(line)
    return graph


def find_cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` for every strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for comp in components:  # a shortest way from the component's first module back to it
        inside, start = set(comp), comp[0]
        came_from, frontier, end = {start: None}, [start], None
        while end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        end = v
                        break
                    if w in inside and w not in came_from:
                        came_from[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = []  # end, ..., start, following came_from
        while end is not None:
            path.append(end)
            end = came_from[end]
        cycles.append(path[::-1] + [start])
    return cycles


def layer_of(module: str, layers, package: str = PACKAGE) -> int | None:
    """Index of the layer whose prefix matches ``module`` longest, None when none does."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            hit = module == p or (p != package and module.startswith(p + "."))
            if hit and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def upward_edges(graph, layers, known=frozenset(), package: str = PACKAGE) -> list[tuple[str, str, list[int], str]]:
    """(importer, imported, lines, description) for each import of a higher layer not in ``known``."""
    found = []
    for src in sorted(graph):
        ls = layer_of(src, layers, package)
        for dst, lines in sorted(graph[src].items()):
            ld = layer_of(dst, layers, package)
            if ls is not None and ld is not None and ld > ls and (src, dst) not in known:
                found.append((src, dst, lines, f"{src} (layer {layers[ls][0]!r}) imports {dst} "
                                               f"(layer {layers[ld][0]!r}) at line(s) {lines}"))
    return found


def _describe_cycle(cycle: list[str], graph) -> str:
    return " -> ".join(cycle) + "  (" + ", ".join(
        f"{a}:{graph[a][b][0]}" for a, b in zip(cycle, cycle[1:])) + ")"


@pytest.fixture(scope="module")
def graph():
    return module_graph(ROOT, PACKAGE)


def test_every_module_has_a_layer(graph):
    missing = sorted(m for m in graph if layer_of(m, LAYERS) is None)
    assert not missing, f"no layer in LAYERS for {missing}: add them to the layer they belong to"


def test_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe_cycle(c, graph) for c in cycles)


def test_no_import_runs_up_the_layers(graph):
    up = upward_edges(graph, LAYERS, KNOWN)
    assert not up, "imports up the layers:\n" + "\n".join(d for *_, d in up)


def test_known_edges_are_still_there(graph):
    stale = sorted(e for e in KNOWN if e[1] not in graph.get(e[0], {}))
    assert not stale, f"these KNOWN edges are gone, drop them from KNOWN: {stale}"


def test_the_checks_can_fail(tmp_path):
    """A synthetic package with a lazy relative-import cycle and an upward edge: both are reported."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    files = {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "from toy.low import b\n",  # a submodule named in a from-import
        "low/b.py": "def f():\n    from .a import x  # lazy and relative\n",
        "low/c.py": "import importlib\nm = importlib.import_module('toy.high.top')\n",
        "high/__init__.py": "",
        "high/top.py": "from ..low.a import name\nimport toy.low\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    g = module_graph(tmp_path, "toy")
    assert set(g["toy.low.a"]) == {"toy.low.b"}
    assert set(g["toy.low.b"]) == {"toy.low.a"}
    assert set(g["toy.high.top"]) == {"toy.low.a", "toy.low"}
    assert set(g["toy.low.c"]) == {"toy.high.top"}

    assert find_cycles(g) == [["toy.low.a", "toy.low.b", "toy.low.a"]]
    layers = [("low", ("toy", "toy.low")), ("high", ("toy.high",))]
    up = upward_edges(g, layers, package="toy")
    assert [(s, d) for s, d, *_ in up] == [("toy.low.c", "toy.high.top")]
    assert upward_edges(g, layers, known={("toy.low.c", "toy.high.top")}, package="toy") == []
    assert layer_of("toy.high", layers, "toy") == 1 and layer_of("toy.other", layers, "toy") is None
