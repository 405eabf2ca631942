"""The first run: kernel compilation is announced, done before the prompt, kept out of the
token rates, and remembered (pixlocal/warm.py, cli warmup)."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

import pixlocal
from pixlocal.cli import warm
from pixlocal.cli.app import app
from pixlocal.kernels import jit


@pytest.fixture(scope="module")
def q4(tmp_path_factory, tiny_ckpt):
    from pixlocal.quant import quantize_checkpoint
    out = tmp_path_factory.mktemp("q") / "q4"
    quantize_checkpoint(tiny_ckpt, out, bits=4)
    return out


def test_warmup_compiles_the_decode_path_and_remembers(q4, tmp_path, monkeypatch):
    monkeypatch.setenv("PIXLOCAL_NUMBA_CACHE", str(jit.cache_dir()))  # the shared cache
    m = pixlocal.load(q4)
    warm.warmup(m)
    assert not warm.needs_warmup(m)
    assert "_gemv" not in jit.uncompiled() and "_layer" not in jit.uncompiled()
    warm._marker(m).unlink()
    assert warm.needs_warmup(m) == bool(jit.uncompiled())


def test_ask_announces_compilation_and_keeps_it_out_of_the_rates(q4, sample_png,
                                                                 monkeypatch):
    calls = []
    monkeypatch.setattr(warm, "needs_warmup", lambda m: True)
    monkeypatch.setattr(warm, "warmup", lambda m: calls.append(m) or time.sleep(1.2))
    r = CliRunner().invoke(app, ["ask", str(sample_png), "Caption this.", "-m", str(q4),
                                 "--max-tokens", "3", "--json"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    assert "compiled CPU kernels in" in r.stderr
    import json
    rec = json.loads(r.stdout)
    assert rec["timings"]["total_s"] < 1.2  # the 1.2 s of "compiling" is not in the answer's time


def test_cached_kernels_load_before_the_first_token(q4):
    """A later run loads its cached kernels at load time, not inside the first decode step."""
    import subprocess
    import sys
    m = pixlocal.load(q4)
    warm.warmup(m)  # compiled and in numba's disk cache
    code = ("import pixlocal; from pixlocal.kernels import jit; "
            f"m = pixlocal.load({str(q4)!r}); n = jit.preload(); "
            "print(n, '_gemv' in jit.uncompiled())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
    n, pending = r.stdout.split()
    assert int(n) >= 1 and pending == "False", r.stderr[-2000:]


def test_the_marker_holds_only_while_numbas_cache_has_its_kernels(tmp_path, monkeypatch):
    """A fresh clone has new source files, which numba's cache does not recognise: the
    kernels a warm-up compiled are uncompiled again, and the first run says so again."""
    mark = tmp_path / "warm-x"
    assert not warm.up_to_date(mark)  # no marker
    mark.write_text('["_gemv", "_layer"]\n')
    monkeypatch.setattr(jit, "uncompiled", lambda: ["_attend_par"])  # not one it needs
    assert warm.up_to_date(mark)
    monkeypatch.setattr(jit, "uncompiled", lambda: ["_gemv"])
    assert not warm.up_to_date(mark)
    mark.write_text("6.1\n")  # an older marker's format
    assert not warm.up_to_date(mark)
