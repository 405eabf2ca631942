"""`pixlocal ask` stopped with Ctrl-C (SIGINT) in the middle of a long answer keeps what it
had: plain output ends the partial text with a newline and prints the stats line, --json
prints the partial answer with finish_reason "interrupted"; both exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cli_fixtures

tiny_registry = cli_fixtures.tiny_registry  # a fixture

# the real entry point, with a marker file touched once three tokens have been handed out
_RUN = """
import pathlib, sys
import pixlocal.cli.ask as ask
from pixlocal.cli.app import main

marker = pathlib.Path(sys.argv.pop(1))
load = ask.load_model

def load_model(*a, **kw):
    m, secs, label = load(*a, **kw)
    stream = m.stream_encoded

    def counted(*a, **kw):
        for i, step in enumerate(stream(*a, **kw)):
            yield step
            if i == 2:
                marker.touch()

    m.stream_encoded = counted
    return m, secs, label

ask.load_model = load_model
sys.argv[0] = "pixlocal"
main()
"""


def _start(marker, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RUN, str(marker), "ask", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_keeps_the_partial_answer(tiny_registry, sample_png, tmp_path):
    args = [str(sample_png), "Describe it at length.", "-m", "tiny", "--dtype", "float32",
            "--max-tokens", "8000"]  # far longer than the test waits
    procs = {"plain": _start(tmp_path / "plain", *args),
             "json": _start(tmp_path / "json", *args, "--json")}
    deadline = time.monotonic() + 120
    for name, p in procs.items():
        while not (tmp_path / name).exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, f"{name}: no tokens within 120 s"
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGINT)
    out = {name: p.communicate(timeout=60) + (p.returncode,) for name, p in procs.items()}

    stdout, stderr, code = out["plain"]
    assert code == 130, stderr
    assert stdout.strip() and stdout.endswith("\n") and stdout.count("\n") >= 1
    assert "interrupted" in stderr and "tokens at" in stderr and "Traceback" not in stderr

    stdout, stderr, code = out["json"]
    assert code == 130, stderr
    d = json.loads(stdout)  # the whole stdout is one JSON object
    assert d["finish_reason"] == "interrupted" and 3 <= len(d["tokens"]) < 8000
    assert d["text"] and set(d["timings"]) >= {"load_s", "prefill_s", "gen_tps"}
    assert "Traceback" not in stderr
