"""The README's quick start works as written: its runnable shell blocks run, literally, in a
fresh copy of the repository (a new virtualenv included), and the test command it gives is
the one CI runs.

Blocks are marked by the comment line before their fence:
`<!-- readme-test: run -->` runs here; `<!-- readme-test: ci -->` is what .ci/run runs (the
test suite itself, which cannot run inside itself)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"<!-- readme-test: (\w+) -->\n```(?:sh|bash|console)?\n(.*?)```", re.S)


def blocks(kind: str) -> list[str]:
    return [body.strip() for k, body in MARK.findall((ROOT / "README.md").read_text())
            if k == kind]


def fresh_copy(dst: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and not ignored)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    return dst


def test_readme_marks_its_two_commands():
    assert len(blocks("run")) == 1 and len(blocks("ci")) == 1
    assert blocks("run")[0].startswith("python3 -m venv .venv")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    for line in blocks("ci"):
        assert line in ci, f".ci/run does not run the README's test command: {line}"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs the git checkout to copy")
def test_quick_start_runs_in_a_fresh_copy(tmp_path):
    repo = fresh_copy(tmp_path / "clone")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    venv_bin = str(Path(os.environ.get("VIRTUAL_ENV", "/nonexistent")) / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != venv_bin)  # the block makes and activates its own
    env["PIXLOCAL_HOME"] = str(tmp_path / "home")  # the demo model is made here
    for cmd in blocks("run"):
        r = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True,
                           text=True, timeout=1200)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip(), "no answer on stdout"
        assert "its words are noise" in r.stderr and "Traceback" not in r.stderr
        assert re.search(r"\d+ prompt tokens in .* tokens at", r.stderr), r.stderr[-2000:]
    assert (repo / ".venv" / "bin" / "pixlocal").exists()
