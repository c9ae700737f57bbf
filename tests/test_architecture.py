"""The package's import contract (docs/architecture.md), computed from the source with ``ast``: every
import counts, at module level or inside a function. No import cycle, no module reaching for another
module's ``_private`` names, and imports point only to the importer's own layer or the layers below:

    base (errors)  <-  kernels  <-  engine  <-  quant  <-  api (package face, resolve)  <-  tools  <-  cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "microcnn"

# Lowest first. A module is in the first layer whose prefix matches it; every module must be listed.
LAYERS = {
    "base": ("microcnn.errors",),
    "kernels": ("microcnn.kernels",),
    "engine": ("microcnn.fileutil", "microcnn.jsonutil", "microcnn.checks",
               "microcnn.autograd", "microcnn.convolution", "microcnn.layers", "microcnn.model",
               "microcnn.network", "microcnn.graph",
               "microcnn.losses", "microcnn.optim", "microcnn.io", "microcnn.datasets", "microcnn.lenet",
               "microcnn.timing", "microcnn.onnx_io", "microcnn.torch_io"),
    "quant": ("microcnn.quant",),
    "api": ("microcnn", "microcnn.resolve"),
    "tools": ("microcnn.bench", "microcnn.compare", "microcnn.analysis", "microcnn.plots",
              "microcnn.widgets", "microcnn.report", "microcnn.train", "microcnn.sweep"),
    "cli": ("microcnn.cli", "microcnn.cliargs"),
}
RANK = {name: rank for rank, name in enumerate(LAYERS)}


def modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``)."""
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = (path, path.name == "__init__.py")
    return found


def imports(mods: dict, pkg: str = "microcnn") -> dict[str, set[tuple[str, str | None]]]:
    """Module -> {(imported module of the package, name taken from it or None)}, every import counted."""
    out = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                pairs = [(source, a.name) for a in node.names]
            else:
                continue
            for source, name in pairs:
                if not source or source.split(".")[0] != pkg:
                    continue
                target = f"{source}.{name}" if name and f"{source}.{name}" in mods else source
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                if target != mod and target in mods:
                    out[mod].add((target, name if target == source else None))
    return out


def layer_of(module: str) -> str:
    best = None  # the longest matching prefix: microcnn.quant is in quant, microcnn itself in api
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)  # noqa: E702
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)  # noqa: E702
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)  # noqa: E702
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


@pytest.fixture(scope="module")
def graph():
    return imports(modules())


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_import_cycle(graph):
    edges = {m: {t for t, _ in targets} for m, targets in graph.items()}
    assert cycles(edges) == []


def test_imports_point_only_down(graph):
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
              for m, targets in graph.items() for t, _ in targets if RANK[layer_of(t)] > RANK[layer_of(m)]]
    assert upward == []


def test_no_cross_module_private_import(graph):
    private = [f"{m} takes {t}.{name}" for m, targets in graph.items() for t, name in targets
               if name and name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_argparse_lives_in_the_command_line_only():
    def names(node):
        return [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]

    users = [m for m, (path, _) in modules().items() if layer_of(m) != "cli"
             and any(isinstance(n, ast.Import | ast.ImportFrom) and "argparse" in names(n)
                     for n in ast.walk(ast.parse(path.read_text())))]
    assert users == []


def test_the_checker_sees_what_it_must(tmp_path):
    """The graph counts imports inside functions and relative imports, and the cycle finder finds a
    cycle closed by one of them (a planted cycle, so the checks above can fail)."""
    pkg = tmp_path / "microcnn"
    (pkg / "quant").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("def load():\n    from .quant.serialize import _loader\n")
    (pkg / "quant" / "__init__.py").write_text("")
    (pkg / "quant" / "serialize.py").write_text("from .. import io\n")
    graph = imports(modules(pkg))
    assert graph["microcnn.io"] == {("microcnn.quant.serialize", "_loader")}
    assert graph["microcnn.quant.serialize"] == {("microcnn.io", None)}
    edges = {m: {t for t, _ in ts} for m, ts in graph.items()}
    assert cycles(edges) == [["microcnn.io", "microcnn.quant.serialize"]]
    assert RANK[layer_of("microcnn.io")] < RANK[layer_of("microcnn.quant.serialize")]
