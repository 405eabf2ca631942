"""Guard rails from DESIGN.md §2: import direction, no printing in the library, sizes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB = sorted((ROOT / "pixlocal").rglob("*.py"))
QUANT = sorted((ROOT / "quant").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(("." * node.level) + node.module)
    return names


def test_library_never_imports_quant_or_cli():
    for p in LIB:
        bad = {n for n in _imports(p) if n.startswith(("pixlocal.quant", "pixlocal.cli",
                                                       "quant", "cli", "..quant", "..cli"))}
        assert not bad, f"{p.relative_to(ROOT)} imports {bad}"


def test_numba_only_in_cpu_kernels_and_transformers_only_in_tests():
    cpu_backend = ("cpu.py", "cpu_attn.py", "cpu_layout.py", "cpu_decode.py",
                   "threads.py", "jit.py")  # kernels, their thread counts and compile cache
    for p in LIB + QUANT + sorted((ROOT / "cli").rglob("*.py")):
        names = _imports(p)
        if p.name not in cpu_backend or p.parent.name != "kernels":
            assert not any(n.split(".")[0] == "numba" for n in names), p
        assert not any(n.split(".")[0] == "transformers" for n in names), p


def test_no_print_in_library_or_quantizer():
    for p in LIB + QUANT:
        if p.name in ("synthetic.py",):  # a dev tool with its own __main__
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                raise AssertionError(f"print() in {p.relative_to(ROOT)}:{node.lineno}")


def test_model_modules_do_no_io():
    for name in ("model.py", "vision.py", "layers.py", "rope.py"):
        names = _imports(ROOT / "pixlocal" / name)
        assert not names & {"os", "pathlib", "json", "safetensors", "sys", "io"}, name


def test_module_line_budget():
    for p in LIB + QUANT:
        n = len(p.read_text().splitlines())
        assert n <= 360, f"{p.relative_to(ROOT)} has {n} lines (budget 300 + 20%)"
