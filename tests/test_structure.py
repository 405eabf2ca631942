"""The shape of the code (DESIGN §2): no import cycles among pixlocal/, quant/ (pixlocal.quant)
and cli/ (pixlocal.cli); model.py and vision.py are modules only; backend names are compared
nowhere outside pixlocal/kernels/. Read from the sources with ast: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pixlocal": ROOT / "pixlocal", "pixlocal.quant": ROOT / "quant",
            "pixlocal.cli": ROOT / "cli"}
BACKEND_NAMES = {"ref", "cpu", "cuda"}
MACHINERY = ("pixlocal.kernels", "pixlocal.qlinear", "pixlocal.placement", "pixlocal.loader")


def modules() -> dict[str, Path]:
    """Dotted module name → file, as the installed package names them."""
    out = {}
    for pkg, d in PACKAGES.items():
        for f in sorted(d.rglob("*.py")):
            parts = [p for p in f.relative_to(d).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


MODS = modules()


def imports_of(name: str, tree: ast.AST) -> set[str]:
    """Project modules `name` imports anywhere in its file (inside functions and `if` blocks
    too): `from P import m` counts as P.m where that is a module, else as P."""
    is_pkg = MODS[name].name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                found.add(sub if sub in MODS else mod)
    # a package's __init__ runs before its modules: importing it from inside is no cycle
    return {m for m in found if m in MODS and m != name and not name.startswith(m + ".")}


def graph() -> dict[str, set[str]]:
    return {m: imports_of(m, ast.parse(f.read_text(), str(f))) for m, f in MODS.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_cycles():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": {"e"}, "f": set()}
    assert sorted(cycles(g)) == [["a", "b", "c"], ["e", "e2"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_resolved_relative_absolute_and_lazy():
    tree = ast.parse("from . import memory, errors\nfrom .qformat import QuantSpec\n"
                     "def f():\n    from pixlocal.kernels import backend\n    import pixlocal.cli.hub\n"
                     "    from ..cli import models\n")
    assert imports_of("pixlocal.placement", tree) == {
        "pixlocal.memory", "pixlocal.errors", "pixlocal.qformat", "pixlocal.kernels.backend",
        "pixlocal.cli.hub"}  # ..cli from pixlocal.placement is outside the project: not counted
    tree = ast.parse("from .common import err\nfrom . import app\nfrom pixlocal import cli\n")
    assert imports_of("pixlocal.cli.models", tree) == {"pixlocal.cli.common", "pixlocal.cli.app"}


def test_no_import_cycles():
    assert len(MODS) > 30 and "pixlocal.quant.convert" in MODS and "pixlocal.cli.app" in MODS
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_engine_never_imports_quant_or_cli():
    g = graph()
    def outer(m: str) -> bool:
        return any(m == p or m.startswith(p + ".") for p in ("pixlocal.quant", "pixlocal.cli"))
    bad = {m: sorted(filter(outer, ts)) for m, ts in g.items() if not outer(m)}
    assert not {m: t for m, t in bad.items() if t}


def test_model_and_vision_are_modules_only():
    g = graph()
    for m in ("pixlocal.model", "pixlocal.vision"):
        bad = sorted(t for t in g[m] if any(t == x or t.startswith(x + ".") for x in MACHINERY))
        assert not bad, f"{m} imports {bad}"


def _names(node: ast.AST) -> list[str]:
    """Identifiers an expression reads: variables, attributes, called functions."""
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.append(n.id)
        elif isinstance(n, ast.Attribute):
            out.append(n.attr)
    return out


def _backend_names(node: ast.AST) -> set[str]:
    """Backend-name string constants in an operand ("cpu", or ("ref", "cpu") for `in`)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {n.value for n in items
            if isinstance(n, ast.Constant) and n.value in BACKEND_NAMES}


def backend_comparisons(source: str) -> list[int]:
    """Lines comparing something named like a backend (`backend`, `self.backend.name`,
    `default_backend(dev)`, or a variable assigned from such an expression) with "ref" /
    "cpu" / "cuda" (==, !=, in, not in). A device's type ("cuda" == dev.type) is a device
    fact, not a backend choice: not matched."""
    tree = ast.parse(source)
    aliases = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and any("backend" in x.lower() for x in _names(n.value))
               for t in n.targets if isinstance(t, ast.Name)}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        consts = [o for o in operands if _backend_names(o)]
        names = [n for o in operands if not _backend_names(o) for n in _names(o)]
        if consts and any("backend" in n.lower() or n in aliases for n in names):
            lines.append(node.lineno)
    return lines


def test_backend_comparison_finder():
    hits = backend_comparisons(
        'if backend == "cuda": pass\n'  # 1
        'x = self.backend.name != "cpu"\n'  # 2
        'y = kernels.default_backend(dev) in ("ref", "cpu")\n'  # 3
        'z = dev.type == "cuda"\n'  # a device, not a backend
        'w = backend == "auto"\n'  # not a backend name
        'v = "cuda" == m.backend\n'  # 6
        'cpu = kernels.default_backend("cpu")\n'
        'u = "fast" if cpu == "cpu" else "slow"\n')  # 8: a variable holding a backend name
    assert hits == [1, 2, 3, 6, 8]


def test_no_backend_name_comparisons_outside_kernels():
    kernels = ROOT / "pixlocal" / "kernels"
    found = [f"{f.relative_to(ROOT)}:{line}" for f in MODS.values()
             if kernels not in f.parents for line in backend_comparisons(f.read_text())]
    assert not found, f"backend names compared outside kernels/: {found}"


@pytest.mark.parametrize("name", ["pixlocal.model", "pixlocal.vision", "pixlocal.memory",
                                  "pixlocal.qformat"])
def test_listed_modules_exist(name):
    assert name in MODS  # the checks above would pass vacuously on a renamed module
