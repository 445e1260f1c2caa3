"""lowbit's modules import one way: no module imports one that (directly or not) imports it back.

The graph is read from the source (ast), not by importing: an edge A -> B for every
``import B`` / ``from B import x`` / ``from package import B`` inside lowbit. Module-level imports
must form no cycle at all; imports inside functions (the usual way to hide a cycle) are checked
too, so a circle cannot be dodged by moving one of its imports into a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowbit

ROOT = Path(lowbit.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


def _toplevel(tree: ast.Module) -> list[ast.stmt]:
    """Statements run at import: the body and what top-level if/try blocks hold (not TYPE_CHECKING)."""
    out, stack = [], list(tree.body)
    while stack:
        n = stack.pop()
        out.append(n)
        if isinstance(n, ast.If) and not (isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING"):
            stack += n.body + n.orelse
        elif isinstance(n, ast.Try):
            stack += n.body + n.orelse + n.finalbody + [s for h in n.handlers for s in h.body]
    return out


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for mod, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = _toplevel(tree) if module_level_only else list(ast.walk(tree))
        out = set()
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names if a.name in mods}
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (n.level - 1)]
                    target = ".".join(base + ([n.module] if n.module else []))
                else:
                    target = n.module
                for a in n.names:
                    if f"{target}.{a.name}" in mods:
                        out.add(f"{target}.{a.name}")  # from package import submodule
                    elif target in mods:
                        out.add(target)
        out.discard(mod)
        graph[mod] = out
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_the_package():
    g = import_graph(module_level_only=True)
    assert "lowbit.models.loading" in g and "lowbit.models.files" in g["lowbit.models.loading"]
    assert "lowbit.errors" in g["lowbit"]


def test_cycle_finder_on_a_known_graph():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]


def test_no_module_level_import_cycle():
    assert cycles(import_graph(module_level_only=True)) == []


def test_no_import_cycle_hidden_in_functions():
    assert cycles(import_graph(module_level_only=False)) == []


def test_llm_side_does_not_import_the_cnn_package():
    """lowbit.cnn builds on the LLM methods' configs and the shared integer helpers, never the
    reverse: nothing under algorithms, calibration or formats imports it, not even inside a function."""
    g = import_graph(module_level_only=False)
    assert any(m.startswith("lowbit.cnn.") for m in g), "the CNN package is missing from the graph"
    bad = sorted(f"{m} -> {t}" for m, ts in g.items()
                 if m.split(".")[:2] in (["lowbit", "algorithms"], ["lowbit", "calibration"], ["lowbit", "formats"])
                 for t in ts if t == "lowbit.cnn" or t.startswith("lowbit.cnn."))
    assert bad == []
