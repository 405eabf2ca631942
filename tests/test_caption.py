"""`pixlocal caption` as a real process: interrupted by SIGINT and by SIGKILL, then
--resume'd; every image ends with exactly one record and nothing recorded is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cli_fixtures
import pytest

tiny_registry = cli_fixtures.tiny_registry  # a fixture

N_GOOD = 12


def _records(out):
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def _start(folder, out, *extra):
    cmd = [sys.executable, "-m", "pixlocal.cli.app", "caption", str(folder), "-o", str(out),
           "--max-tokens", "60", "--dtype", "float32", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_records(proc, out, n, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(out.read_text().splitlines()) >= n if out.exists() else False:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"no {n} records within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_then_resumed_loses_nothing(tiny_registry, tmp_path, sig):
    good, bad = cli_fixtures.make_image_folder(tmp_path / "imgs", n_good=N_GOOD)
    everything = sorted(str(p) for p in good + list(bad.values()))
    out = tmp_path / "caps.jsonl"

    proc = _start(tmp_path / "imgs", out)
    _wait_for_records(proc, out, 3)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    before = _records(out)
    assert 3 <= len(before) < len(everything), "the run was not interrupted mid-way"
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "interrupted" in stderr and "--resume" in stderr
        assert out.read_text().endswith("\n")
    else:
        assert proc.returncode == -signal.SIGKILL

    proc = _start(tmp_path / "imgs", out, "--resume")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr  # the broken images were recorded as failures
    after = _records(out)
    paths = [str((tmp_path / "imgs" / r["path"]).resolve()) if not r["path"].startswith("/")
             else r["path"] for r in after]
    assert sorted(paths) == everything  # exactly one record per image
    assert after[: len(before)] == before  # what the first run recorded is kept as it was
    assert f"skipped {len(before)}" in stderr and stdout == ""
    by_path = dict(zip(paths, after, strict=True))
    assert all("caption" in by_path[str(p)] for p in good)
    assert all("error" in by_path[str(p)] for p in bad.values())
