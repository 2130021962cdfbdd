"""Imports flow one way: every import of a pfnas module (deferred ones inside functions included) points to a
lower layer or within its own layer without a cycle; no module imports another's ``_private`` name; only the CLI
(and the package front's lazy ``load_model``) import pfnas modules inside functions. docs/architecture.md draws
the same picture."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "pfnas"

# bottom to top; a module may import from its own layer or any layer below it
LAYERS = [
    ["pfnas._version", "pfnas.errors"],
    ["pfnas.config"],
    ["pfnas.runtime", "pfnas.sysinfo", "pfnas.timing"],
    ["pfnas.model", "pfnas.data", "pfnas.pae"],
    ["pfnas.export"],
    ["pfnas.engine"],
    ["pfnas.methods", "pfnas.bench"],
    ["pfnas.provenance", "pfnas.tracking"],
    ["pfnas.runs"],
    ["pfnas.tune"],
    ["pfnas.cli", "pfnas.__main__", "pfnas"],
]
DEFERRED_OK = {"pfnas.cli", "pfnas"}  # start-up time: the CLI and the front load torch-heavy modules on use


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]):
    """(imported module, imported names, inside a function?) for every pfnas import of ``name``."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nested: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "pfnas":
                    yield a.name, [], id(node) in nested
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "pfnas":
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            yield target, [n for n in names if f"{target}.{n}" not in mods], id(node) in nested
            for s in subs:
                yield s, [], id(node) in nested


def _layer(name: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) for m in layer
             if name == m or (m != "pfnas" and name.startswith(m + "."))]
    assert found, f"{name} is in no layer of tests/test_layers.py: place it"
    return found[0]


def _graph():
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    records = []
    for name, path in mods.items():
        for target, names, deferred in _imports(name, path, mods):
            if target != name and target in mods:
                edges[name].add(target)
                records.append((name, target, names, deferred))
    return mods, edges, records


def test_every_import_points_down_the_layers():
    mods, _, records = _graph()
    for m in mods:
        _layer(m)
    upward = [f"{a} -> {b}" for a, b, _, _ in records if _layer(b) > _layer(a)]
    assert not upward, "imports pointing up the layers: " + "; ".join(sorted(upward))


def test_no_import_cycle_counting_deferred_imports():
    _, edges, _ = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_across_modules_and_deferred_imports_only_in_the_cli():
    _, _, records = _graph()
    private = [f"{a} imports {n} from {b}" for a, b, names, _ in records for n in names
               if n.startswith("_") and not n.startswith("__")]
    assert not private, "; ".join(sorted(private))
    deferred = sorted({f"{a} -> {b}" for a, b, _, d in records if d and a not in DEFERRED_OK})
    assert not deferred, "pfnas imports inside functions outside the CLI: " + "; ".join(deferred)


def test_the_checker_sees_a_planted_cycle(tmp_path):
    """The walker is not vacuous: a deferred import inside a function is found and its layer judged."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from pfnas.cli import main\n")
    found = list(_imports("pfnas.config", src, _modules()))
    assert ("pfnas.cli", ["main"], True) in found
    assert _layer("pfnas.cli") > _layer("pfnas.config")
