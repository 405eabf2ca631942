"""`pixlocal chat` in a real terminal (tmux): line editing and history through readline,
/image, a question, Ctrl-C in the middle of a long answer, another question answered, /save,
/quit. The saved conversation's counters show the image was encoded once, in the first turn."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import cli_fixtures
import pytest

tiny_registry = cli_fixtures.tiny_registry  # a fixture

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


_PARENT = ("import signal, subprocess, sys\n"
           "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
           "r = subprocess.call(sys.argv[2:], preexec_fn=lambda: signal.signal("
           "signal.SIGINT, signal.SIG_DFL))\n"
           "open(sys.argv[1], 'w').write(str(r))\n")


class Tmux:
    """A private tmux server running one command under a small Python parent that ignores
    Ctrl-C (the child gets it, with the default handler restored) and writes the child's exit
    status to a file. tmux 3.3a sometimes leaves an exited pane process unreaped, so its
    #{pane_dead_status} can stay empty forever; the file does not depend on tmux."""

    def __init__(self, argv: list[str], env: dict[str, str], status_file):
        self.sock = f"pixlocal-test-{os.getpid()}-{time.monotonic_ns()}"
        self.status_file = status_file
        envs = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        self.tmux("new-session", "-d", "-s", "t", "-x", "160", "-y", "50", *envs,
                  sys.executable, "-c", _PARENT, str(status_file), *argv)
        self.tmux("set-option", "-t", "t", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-f", "/dev/null", "-L", self.sock, *args], check=True,
                              capture_output=True, text=True).stdout

    def exit_status(self) -> int | None:
        text = self.status_file.read_text() if self.status_file.exists() else ""
        return int(text) if text.strip() else None

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", "t")

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "t", *keys)

    def wait_for(self, pred, what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.screen()
            if pred(s):
                return s
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True)


def chat_with_image(tmp_path, sample_png, *options: str) -> Tmux:
    """`pixlocal chat` in a tmux terminal, at its prompt with sample_png attached."""
    env = {k: os.environ[k] for k in ("PIXLOCAL_HOME", "PIXLOCAL_MODELS_TOML", "PATH")}
    env["TERM"] = "xterm-256color"
    t = Tmux([sys.executable, "-m", "pixlocal.cli.app", "chat", *options, "--dtype",
              "float32"], env, tmp_path / "exit_status")
    try:
        t.wait_for(lambda s: ">>> " in s, "the prompt")
        t.keys(f"/image {sample_png}", "Enter")
        t.wait_for(lambda s: "attached" in s, "/image")
    except BaseException:
        t.close()
        raise
    return t


def test_chat_in_a_terminal(tiny_registry, tmp_path, sample_png):
    saved = tmp_path / "conv.json"
    t = chat_with_image(tmp_path, sample_png, "--max-tokens", "5000")
    try:
        t.keys("describe it", "Enter")
        # wait until a good part of the answer has streamed, then Ctrl-C in the middle of it
        t.wait_for(lambda s: len(s.split("describe it", 1)[-1].strip()) > 400, "streaming")
        t.keys("C-c")
        s = t.wait_for(lambda s: s.rstrip().endswith(">>>"), "the prompt after Ctrl-C")
        assert "stopped" in s and "Traceback" not in s
        t.keys("/set max_tokens 7", "Enter")
        t.wait_for(lambda s: "max_tokens = 7" in s, "/set")
        t.keys("and now?", "Enter")
        t.wait_for(lambda s: s.count("tokens at") >= 2, "the second answer")
        t.keys("/stats", "Enter")
        t.wait_for(lambda s: s.count("images encoded: 1") == 1, "/stats")
        t.keys("Up", "Enter")  # readline history: recalls /stats
        t.wait_for(lambda s: s.count("images encoded: 1") == 2, "history recall")
        t.keys(f"/save {saved}", "Enter")
        t.wait_for(lambda s: "saved 2 turn(s)" in s, "/save")
        t.keys("/quit", "Enter")
        deadline = time.monotonic() + 30
        while t.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.exit_status() == 0, t.screen()
    finally:
        t.close()

    d = json.loads(saved.read_text())
    user1, a1, user2, a2 = d["messages"]
    assert user1["content"] == [{"type": "image", "image": str(sample_png)},
                                {"type": "text", "text": "describe it"}]
    assert a1["stats"]["interrupted"] and 0 < a1["stats"]["generated_tokens"] < 5000
    assert a1["stats"]["images_encoded"] == 1 and a1["content"].strip()
    assert user2["content"] == [{"type": "text", "text": "and now?"}]
    assert not a2["stats"]["interrupted"] and a2["stats"]["generated_tokens"] == 7
    assert a2["stats"]["images_encoded"] == 0  # the second turn did not re-encode the image
    # and it reused the cache: only the tail after the (re-tokenized) first answer was run
    assert a2["stats"]["prefilled_tokens"] < a2["stats"]["prompt_tokens"] - 12
    assert d["stats"]["images_encoded"] == 1
    history = (tmp_path / "home" / "chat_history").read_text().splitlines()
    assert "describe it" in history and "/stats" in history  # kept for the next session


def test_a_turn_that_overflows_keeps_the_pending_image(tiny_registry, tmp_path, sample_png):
    """Loaded with a context smaller than an image prompt: the turn is refused, the image
    stays attached (/stats says so), /save to a missing directory is one error line, and the
    REPL goes on."""
    t = chat_with_image(tmp_path, sample_png, "--context", "16")
    try:
        t.keys("describe it", "Enter")
        s = t.wait_for(lambda s: "no longer fits" in s, "the refusal")
        assert "context window of 16 tokens" in s
        t.keys("/stats", "Enter")
        t.wait_for(lambda s: "turns: 0" in s and "1 image(s) attached" in s, "/stats")
        t.keys(f"/save {tmp_path / 'no' / 'such' / 'dir.json'}", "Enter")
        t.wait_for(lambda s: "error: cannot save to" in s, "the /save error")
        t.keys("/bye", "Enter")
        deadline = time.monotonic() + 30
        while t.exit_status() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert t.exit_status() == 0 and "Traceback" not in t.screen(), t.screen()
    finally:
        t.close()
