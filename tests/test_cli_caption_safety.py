"""`pixlocal caption` loses nothing and records nothing twice: sidecars never overwrite one
another, --resume works from any directory, one -o file takes one run at a time, a full disk or
an unwritable -o is one line, records on a terminal stay out of the progress bar, an empty
folder is an error, and --glob ignores case like the default suffix filter."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cli_fixtures
import pytest
from pixlocal.cli.app import app
from typer.testing import CliRunner

tiny_registry = cli_fixtures.tiny_registry  # a fixture
GEN = ["--max-tokens", "2", "--dtype", "float32"]


def run(*args: str):
    return CliRunner().invoke(app, ["caption", *args])


def one_line(r, *needles: str, code: int = 1) -> str:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_images_sharing_a_stem_get_one_sidecar_each(tiny_registry, tmp_path, sample_png,
                                                     other_png):
    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(sample_png, d / "same.png")
    from PIL import Image
    Image.open(other_png).convert("RGB").save(d / "same.JPG")
    shutil.copy(sample_png, d / "alone.png")
    r = run(str(d), "-f", "txt", *GEN)
    assert r.exit_code == 0, r.stderr
    assert "captioned 3" in r.stderr
    assert "same.JPG and same.png" in r.stderr and "same.JPG.txt, same.png.txt" in r.stderr
    assert sorted(p.name for p in d.glob("*.txt")) == ["alone.txt", "same.JPG.txt",
                                                        "same.png.txt"]
    assert all(p.read_text().strip() for p in d.glob("*.txt"))
    # a run restricted to one of them still takes its unique name, and --resume sees it
    r = run(str(d), "-f", "txt", "--glob", "*.png", "--resume", *GEN)
    assert r.exit_code == 0 and "all already captioned" in r.stderr
    assert not (d / "same.txt").exists()


def test_resume_from_another_directory(tiny_registry, tmp_path, sample_png, monkeypatch):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "sub/c.png"):
        shutil.copy(sample_png, d / name)
    out = tmp_path / "caps.jsonl"
    monkeypatch.chdir(tmp_path)
    r = run("imgs/a.png", "-o", "caps.jsonl", *GEN)
    assert r.exit_code == 0, r.stderr
    assert _records(out)[0]["path"] == str(d / "a.png")  # absolute: valid from anywhere
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = run("../imgs", "-o", "../caps.jsonl", "--resume", *GEN)
    assert r.exit_code == 0, r.stderr
    assert "skipped 1" in r.stderr
    paths = sorted(x["path"] for x in _records(out))
    assert paths == sorted(str(d / n) for n in ("a.png", "b.png", "sub/c.png"))
    # a record an older pixlocal wrote relative to its directory counts too
    with open(out, "a") as f:
        f.write(json.dumps({"path": "imgs/d.png", "caption": "old"}) + "\n")
    shutil.copy(sample_png, d / "d.png")
    monkeypatch.chdir(tmp_path)
    r = run(str(d), "-o", str(out), "--resume", *GEN)
    assert r.exit_code == 0 and "all already captioned" in r.stderr, r.stderr


def test_a_second_run_on_the_same_output_refuses(tiny_registry, tmp_path, sample_png):
    out = tmp_path / "caps.jsonl"
    out.write_text(json.dumps({"path": "/elsewhere/x.png", "caption": "x"}) + "\n")
    with open(out, "a") as held:  # another run is writing it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        for flag in ("--resume", "--overwrite"):
            one_line(run(str(sample_png), "-o", str(out), flag, *GEN), str(out), "locked")
    assert len(_records(out)) == 1  # untouched: neither truncated nor appended to
    r = run(str(sample_png), "-o", str(out), "--resume", *GEN)  # the lock is gone with it
    assert r.exit_code == 0 and len(_records(out)) == 2, r.stderr


def test_unwritable_outputs_are_one_line(tiny_registry, tmp_path, sample_png):
    one_line(run(str(sample_png), "-o", str(tmp_path), *GEN), str(tmp_path), "directory")
    if Path("/proc/self").is_dir():
        one_line(run(str(sample_png), "-o", "/proc/x", *GEN), "/proc/x")
    (tmp_path / "file").write_text("")
    one_line(run(str(sample_png), "-o", str(tmp_path / "file" / "caps.jsonl"), *GEN),
             "caps.jsonl")


def test_a_full_disk_stops_the_run_with_one_line(tiny_registry, sample_png, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        shutil.copy(sample_png, d / f"{i}.png")
    t0 = time.perf_counter()
    line = one_line(run(str(d), "-o", "/dev/full", "--max-tokens", "2"), "/dev/full",
                    "No space left on device")
    assert "captioned" not in line and time.perf_counter() - t0 < 60


def test_an_empty_folder_is_an_error(tiny_registry, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no pictures here")
    one_line(run(str(tmp_path / "empty")), "no images found", "empty")
    one_line(run(str(tmp_path / "empty"), "--glob", "*.jpg"), "no images found", "'*.jpg'")


def test_glob_ignores_case(tiny_registry, tmp_path, sample_png):
    d = tmp_path / "imgs"
    (d / "Sub").mkdir(parents=True)
    for name in ("UPPER.PNG", "lower.png", "Sub/Mixed.Png", "other.jpg"):
        shutil.copy(sample_png, d / name)
    r = run(str(d), "--glob", "*.png", *GEN)
    assert r.exit_code == 0, r.stderr
    got = sorted(Path(x["path"]).name for x in map(json.loads, r.stdout.splitlines()))
    assert got == ["Mixed.Png", "UPPER.PNG", "lower.png"]
    r = run(str(d), "--glob", "sub/*.PNG", *GEN)  # a pattern with a folder in it
    assert [Path(json.loads(x)["path"]).name for x in r.stdout.splitlines()] == ["Mixed.Png"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_records_on_a_terminal_stay_out_of_the_progress_bar(tiny_registry, tmp_path,
                                                            sample_png):
    """stdout and stderr on one terminal: every record is a whole line of its own on the
    screen, none glued to or overwritten by the live progress bar."""
    from test_chat_tty import Tmux
    d = tmp_path / "i"
    d.mkdir()
    for i in range(8):
        shutil.copy(sample_png, d / f"{i}.png")
    env = {k: os.environ[k] for k in ("PIXLOCAL_MODELS_TOML", "PIXLOCAL_HOME", "PATH",
                                      "PYTHONPATH") if k in os.environ}
    argv = [sys.executable, "-m", "pixlocal.cli.app", "caption", str(d), "--max-tokens", "12",
            "--dtype", "float32"]
    t = Tmux(argv, {**env, "TERM": "xterm-256color"}, tmp_path / "status")
    try:
        t.wait_for(lambda s: t.exit_status() is not None, "caption to finish", timeout=120)
        screen = t.screen()
    finally:
        t.close()
    assert t.exit_status() == 0, screen
    recs = [line for line in screen.splitlines() if '"path"' in line]
    assert len(recs) == 8, screen
    parsed = [json.loads(line) for line in recs]  # nothing else on a record's line
    assert sorted(Path(x["path"]).name for x in parsed) == [f"{i}.png" for i in range(8)]
    assert "captioned 8, failed 0" in screen
