"""The first-party import graph: no cycles, and imports only go downward.

The graph is read statically with ``ast`` (nothing is imported, nothing compiles): one node
per module of ``jaxllm``, ``sharding``, ``pallas_kernels`` and ``cpu_kernels``; an edge for every first-party
import, whether at module top or inside a function (a lazy import still couples the modules).
``python tests/test_imports.py`` prints the edges, the cycles and the layering violations.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxllm", "sharding", "pallas_kernels", "cpu_kernels")

# Edges allowed to close a cycle, each with the reason it is still there. Empty: none remain.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}

# Leaf modules and the only first-party modules each may import.
LEAVES: dict[str, set[str]] = {
    "jaxllm.config": set(),
    "jaxllm.named_configs": {"jaxllm.config"},
    "jaxllm.hardware": set(),
    "jaxllm.xla_cost": {"cpu_kernels"},  # costs the XLA twins of the C++ kernels
    "jaxllm.compilation": set(),
}

_TOP = ("jaxllm.cli", "jaxllm.serve", "jaxllm.llm", "jaxllm.engine")  # the user-facing layers
_TOOLS = ("jaxllm.bench", "jaxllm.benchmarks", "jaxllm.roofline", "jaxllm.profiling")

# (importer prefix, forbidden prefixes): lower layers know nothing of the layers above them.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("pallas_kernels", ("jaxllm", "sharding")),
    ("cpu_kernels", ("jaxllm", "sharding", "pallas_kernels")),
    ("jaxllm.models", (*_TOP, *_TOOLS, "jaxllm.train", "jaxllm.weights", "jaxllm.tokenizer",
                       "jaxllm.cache", "sharding")),
    ("jaxllm.cache", (*_TOP, *_TOOLS, "jaxllm.train", "jaxllm.weights", "sharding")),
    ("jaxllm.sampling", (*_TOP, *_TOOLS, "jaxllm.models", "jaxllm.weights")),
    ("jaxllm.tokenizer", (*_TOP, *_TOOLS, "jaxllm.weights", "jaxllm.models", "sharding")),
    ("jaxllm.weights", (*_TOP, *_TOOLS, "jaxllm.train", "sharding")),
    ("sharding", (*_TOP, *_TOOLS, "jaxllm.train")),
    ("jaxllm.bench", ("jaxllm.cli", "jaxllm.roofline", "jaxllm.profiling")),
    ("jaxllm.profiling", ("jaxllm.cli", "jaxllm.roofline", "jaxllm.bench")),
    ("jaxllm.roofline", ("jaxllm.cli",)),
    ("jaxllm.benchmarks", ("jaxllm.cli",)),
    ("jaxllm.train", ("jaxllm.cli", "jaxllm.engine", "jaxllm.llm")),
    ("jaxllm.engine", ("jaxllm.cli", "jaxllm.serve", "jaxllm.llm", "jaxllm.train", *_TOOLS)),
    ("jaxllm.llm", ("jaxllm.cli", "jaxllm.serve", "jaxllm.train", *_TOOLS)),
    ("jaxllm.serve", ("jaxllm.cli", "jaxllm.train", *_TOOLS)),
]

# Layering edges still to be cut, each with the reason it is still there.
KNOWN_LAYERING_EXCEPTIONS: dict[tuple[str, str], str] = {
    # LLM(lora=...) merges a PEFT adapter: its reader lives in train.lora (adapter I/O
    # only, no optimizer or training loop) until adapter loading moves out of train.
    ("jaxllm.llm", "jaxllm.train.lora"): "LLM(lora=...) reads the adapter with train.lora",
    ("jaxllm.llm", "jaxllm.train"): "the same import runs jaxllm/train/__init__",
}


class Edge(NamedTuple):
    src: str
    dst: str
    kind: str  # "top": at module top; "lazy": inside a def or class; "package": see below
    line: int

    @property
    def lazy(self) -> bool:
        return self.kind == "lazy"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def first_party_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names or lies inside (``a.b.c`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.Import | ast.ImportFrom, src: str, is_pkg: bool,
             modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolve against the importing package
            pkg = src if is_pkg else src.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}" if base else pkg
        # `from pkg import sub` imports the submodule when there is one.
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    return [t for t in (_resolve(n, modules) for n in names) if t is not None]


def _imports(tree: ast.Module) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement with whether it is lazy (nested in a def or class)."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, lazy))
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            visit(child, lazy or nested)

    visit(tree, False)
    return found


def _packages_run(src: str, dst: str, modules: dict[str, Path]) -> list[str]:
    """Intermediate packages whose ``__init__`` importing ``dst`` runs first (``a.b`` for
    ``a.b.c``), unless ``src`` lives inside them. Top-level packages are left out: their
    ``__init__`` is the public facade and imports only leaf modules eagerly (tested below)."""
    parts = dst.split(".")
    ancestors = (".".join(parts[:i]) for i in range(2, len(parts)))
    return [a for a in ancestors if a in modules and not _within(src, a)]


def import_graph() -> list[Edge]:
    """All first-party import edges, one per (statement, target); self-imports dropped."""
    modules = first_party_modules()
    edges: dict[tuple[str, str, int], Edge] = {}
    for src, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node, lazy in _imports(tree):
            for dst in _targets(node, src, path.name == "__init__.py", modules):
                if dst == src:
                    continue
                edges.setdefault((src, dst, node.lineno),
                                 Edge(src, dst, "lazy" if lazy else "top", node.lineno))
                for pkg in _packages_run(src, dst, modules):
                    edges.setdefault((src, pkg, node.lineno),
                                     Edge(src, pkg, "package", node.lineno))
    return list(edges.values())


def cycles(edges: list[Edge], ignore: set[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), sorted."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        if (e.src, e.dst) not in ignore:
            succ.setdefault(e.src, set()).add(e.dst)
            succ.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                strong(w)
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
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(succ):
        if v not in index:
            strong(v)
    return sorted(comps)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


def layering_violations(edges: list[Edge]) -> list[str]:
    """Edges that break :data:`LEAVES` or :data:`LAYERS` (known exceptions left out)."""
    bad = []
    for e in edges:
        if (e.src, e.dst) in KNOWN_LAYERING_EXCEPTIONS:
            continue
        leaf = e.src in LEAVES and e.dst not in LEAVES[e.src]
        if leaf or any(_within(e.src, importer) and any(_within(e.dst, f) for f in forbidden)
                       for importer, forbidden in LAYERS):
            bad.append(f"{e.src} -> {e.dst} (line {e.line}, {e.kind})")
    return sorted(set(bad))


def test_no_import_cycles():
    comps = cycles(import_graph(), set(KNOWN_CYCLE_EDGES))
    assert not comps, f"import cycles: {comps}"


def test_known_exceptions_are_still_needed():
    edges = {(e.src, e.dst) for e in import_graph()}
    stale = [k for k in (*KNOWN_CYCLE_EDGES, *KNOWN_LAYERING_EXCEPTIONS) if k not in edges]
    assert not stale, f"these edges are gone: remove their exceptions: {stale}"


def test_imports_go_downward():
    assert not layering_violations(import_graph())


def test_library_never_imports_scripts_or_tests():
    for src, path in first_party_modules().items():
        for node, _ in _imports(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            assert not any(n.split(".")[0] in ("scripts", "tests") for n in names), src


def test_facades_import_only_leaves_eagerly():
    # Why the top-level packages are not counted as run by importing their submodules.
    leaves = {"jaxllm": {"jaxllm.config", "jaxllm.sampling"}}
    for e in import_graph():
        if e.src in leaves and e.kind == "top":
            assert e.dst in leaves[e.src], e


def test_checker_sees_every_kind_of_edge():
    kinds = {e.kind for e in import_graph()}
    assert kinds == {"top", "lazy", "package"}


if __name__ == "__main__":
    graph = import_graph()
    for e in sorted(graph):
        print(f"{e.src} -> {e.dst}  ({e.kind}, line {e.line})")
    print("\ncycles:", *cycles(graph), sep="\n  ")
    print("\nlayering violations:", *layering_violations(graph), sep="\n  ")
