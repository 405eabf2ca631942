"""The command line's conventions: usage errors are one line (exit 2), other errors one line
(exit 1), nothing the user typed is read as rich markup, nothing is hard-wrapped off a
terminal, --version, --debug after the command, --threads reaches the loader, a reader that
hangs up ends the run quietly with 0, and no command module imports cli/app.py."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import cli_fixtures
import pytest
from pixlocal.cli.app import app
from typer.testing import CliRunner

tiny_registry = cli_fixtures.tiny_registry  # a fixture
CLI_DIR = Path(__file__).resolve().parents[1] / "cli"


def run(*args: str, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(app, list(args), input=input, env=env)


def one_line(r, *needles: str, code: int = 1) -> str:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "╭" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def small_context(tiny_ckpt, dest: Path, n: int) -> Path:
    """The tiny model with a context window of n tokens (weights and tokenizer linked)."""
    dest.mkdir()
    params = json.loads((tiny_ckpt / "params.json").read_text())
    params["max_seq_len"] = n
    (dest / "params.json").write_text(json.dumps(params))
    for f in ("consolidated.safetensors", "tekken.json"):
        (dest / f).symlink_to(tiny_ckpt / f)
    return dest


# ---- structure ---------------------------------------------------------------------------
def test_no_command_module_imports_the_app():
    for p in sorted(CLI_DIR.glob("*.py")):
        if p.name == "app.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                names = {a.name for a in node.names}
                assert mod not in (".app", "pixlocal.cli.app", "cli.app"), p.name
                assert not (mod == "." and "app" in names), p.name


def test_every_command_is_registered_by_importing_the_app_alone():
    code = ("from typer.main import get_command; from pixlocal.cli.app import app; "
            "print(' '.join(sorted(get_command(app).commands)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert set(out) >= {"ask", "bench", "caption", "chat", "doctor", "info", "models", "pull",
                        "quantize", "rm", "verify"}, out


# ---- usage errors ------------------------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["ask"], ["Missing argument 'IMAGE... PROMPT'", "Try '", "ask --help'"]),
    (["ask", "x.png", "hi", "--bogus"], ["No such option", "--bogus", "ask --help"]),
    (["ask", "x.png", "hi", "--max-tokens", "many"], ["--max-tokens"]),
    (["ask", "x.png", "hi", "--device", "CPU"], ["--device", "'CPU'", "cuda:N"]),
    (["ask", "x.png", "hi", "--device", "tpu"], ["--device", "'tpu'"]),
    (["ask", "x.png", "hi", "--device", "cuda:x"], ["--device", "'cuda:x'"]),
    (["caption", "x", "--device", "tpu"], ["--device"]),
    (["doctor", "--device", "tpu"], ["--device"]),
    (["nosuch"], ["No such command 'nosuch'"]),
])
def test_usage_errors_are_one_line_with_exit_2(args, needles):
    one_line(run(*args), *needles, code=2)


def test_one_positional_naming_an_image_is_a_usage_error(tiny_registry, sample_png):
    """`ask IMAGE -m M` forgot the prompt: the file name is not taken as the question."""
    for src in (str(sample_png), "missing.jpg", "https://example.com/cat.png"):
        one_line(run("ask", src, "-m", "tiny"), "no prompt after the image", code=2)
    r = run("ask", "Say hi in one word.", "-m", "tiny", "--max-tokens", "2",
            "--dtype", "float32")  # a text-only question still works
    assert r.exit_code == 0, r.stderr


def test_version_and_bare_help():
    from pixlocal import __version__
    r = run("--version")
    assert r.exit_code == 0 and r.stdout == f"pixlocal {__version__}\n"
    r = run()
    assert "ask" in r.stdout + r.stderr and "Usage" in r.stdout + r.stderr


def test_debug_after_the_command_shows_the_traceback(tiny_registry, sample_png, monkeypatch):
    monkeypatch.setenv("PIXLOCAL_DEBUG", "")  # --debug sets it; undone after the test
    r = run("ask", str(sample_png), "hi", "-m", "nope", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.stderr and "ModelNotFound" in r.stderr
    assert r.stderr.rstrip().splitlines()[-1].startswith("error: ")
    monkeypatch.setenv("PIXLOCAL_DEBUG", "")
    one_line(run("ask", str(sample_png), "hi", "-m", "nope"), "nope")


# ---- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["[draft] photo.png", "a[/b].png", "[bold]x[/bold].png"])
def test_brackets_in_file_names_are_printed_as_they_are(tmp_path, tiny_ckpt, name):
    line = one_line(run("ask", str(tmp_path / name), "hi", "-m", str(tiny_ckpt)))
    assert f"{tmp_path / name}: not found" in line


def test_rm_prompt_keeps_its_brackets(tiny_registry, tiny_ckpt):
    import shutil

    from pixlocal.config import home
    shutil.copytree(tiny_ckpt, home() / "big")
    r = run("rm", "big:bf16", input="n\n")
    assert r.exit_code == 0 and "[y/N]" in r.stderr and "kept" in r.stderr


def test_threads_from_a_bad_environment_is_one_line(tiny_registry, sample_png):
    one_line(run("ask", str(sample_png), "hi", "-m", "tiny", env={"PIXLOCAL_THREADS": "abc"}),
             "PIXLOCAL_THREADS", "abc")


def test_quantize_into_an_unwritable_place_is_one_line(tiny_ckpt, tmp_path):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc")
    one_line(run("quantize", str(tiny_ckpt), "/proc/q"), "/proc/q")
    one_line(run("quantize", str(tiny_ckpt), "/dev/null/q"), "/dev/null/q")
    (tmp_path / "file").write_text("x")
    one_line(run("quantize", str(tiny_ckpt), str(tmp_path / "file" / "q")), "q")


# ---- output ------------------------------------------------------------------------------
def test_nothing_is_hard_wrapped_off_a_terminal(tiny_registry, tmp_path, monkeypatch):
    home = tmp_path / ("a-rather-long-folder-name-" * 6) / "home"
    monkeypatch.setenv("PIXLOCAL_HOME", str(home))
    r = run("models", env={"COLUMNS": "40"})
    assert r.exit_code == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("big:")]
    assert len(rows) == 2 and all(str(home / "big") in row for row in rows), r.stdout
    status = r.stderr.strip().splitlines()
    assert len(status) == 1 and str(home) in status[0]


def test_threads_reach_the_loader(tiny_registry, sample_png, monkeypatch):
    import pixlocal
    seen: list[dict] = []
    real = pixlocal.load

    def spy(path, **kw):
        seen.append(kw)
        return real(path, **{**kw, "device": "cpu"})

    monkeypatch.setattr(pixlocal, "load", spy)
    common = ["--dtype", "float32", "-t", "2"]
    assert run("ask", str(sample_png), "hi", "-m", "tiny", "--max-tokens", "1",
               *common).exit_code == 0
    assert run("caption", str(sample_png), "-m", "tiny", "--max-tokens", "1",
               *common).exit_code == 0
    assert run("chat", "-m", "tiny", "--max-tokens", "1", *common, input="hi\n").exit_code == 0
    assert run("bench", "tiny", "-p", "8", "-n", "1", "-r", "1", *common).exit_code == 0
    assert [kw.get("threads") for kw in seen] == [2, 2, 2, 2]
    assert run("ask", str(sample_png), "hi", "-m", "tiny", "-t", "0").exit_code == 2
    for cmd in ("ask", "caption", "chat", "bench"):
        help_text = run(cmd, "--help", env={"COLUMNS": "300"}).stdout
        assert "--threads" in help_text and "$PIXLOCAL_THREADS" in help_text, cmd


def test_max_tokens_beyond_the_context_stops_at_its_end(tiny_ckpt, tmp_path, sample_png):
    small = small_context(tiny_ckpt, tmp_path / "small", 40)
    r = run("ask", str(sample_png), "hi", "-m", str(small), "--max-tokens", str(10**9),
            "--json", "--dtype", "float32")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["finish_reason"] == "length" and d["prompt_tokens"] + len(d["tokens"]) == 40


def _closed_stdout(*args: str, env: dict) -> subprocess.CompletedProcess:
    """Run pixlocal with its stdout a pipe whose reader has already gone (`| head`)."""
    p = subprocess.Popen([sys.executable, "-m", "pixlocal.cli.app", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.stderr.close()
    return subprocess.CompletedProcess(args, p.wait(timeout=120), "", err)


def test_a_reader_that_hangs_up_ends_the_run_quietly(tiny_registry, sample_png):
    env = {**os.environ}
    for args in (["models"], ["--help"], ["ask", str(sample_png), "hi", "-m", "tiny",
                                          "--max-tokens", "3", "--dtype", "float32"]):
        r = _closed_stdout(*args, env=env)
        assert r.returncode == 0, (args, r.stderr)
        assert "Traceback" not in r.stderr and "Broken" not in r.stderr, (args, r.stderr)
        assert "Exception ignored" not in r.stderr, (args, r.stderr)


def test_stdout_on_a_full_disk_is_one_line(tiny_registry):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "pixlocal.cli.app", "models", "--json"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], p.stderr
