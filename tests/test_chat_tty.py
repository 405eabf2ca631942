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


class Tmux:
    """A private tmux server running one command directly (no shell in front that Ctrl-C
    could kill); the pane stays after the command exits so its exit status can be read."""

    def __init__(self, argv: list[str], env: dict[str, str]):
        self.sock = f"pixlocal-test-{os.getpid()}-{time.monotonic_ns()}"
        envs = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
        self.tmux("new-session", "-d", "-s", "t", "-x", "160", "-y", "50", *envs, *argv)
        self.tmux("set-option", "-t", "t", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-f", "/dev/null", "-L", self.sock, *args], check=True,
                              capture_output=True, text=True).stdout

    def exit_status(self) -> int | None:
        dead, _, status = self.tmux("display-message", "-p", "-t", "t",
                                    "#{pane_dead} #{pane_dead_status}").strip().partition(" ")
        return int(status) if dead == "1" and status else None  # the status may lag a moment

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


def test_chat_in_a_terminal(tiny_registry, tmp_path, sample_png):
    saved = tmp_path / "conv.json"
    env = {k: os.environ[k] for k in ("PIXLOCAL_HOME", "PIXLOCAL_MODELS_TOML", "PATH")}
    env["TERM"] = "xterm-256color"
    t = Tmux([sys.executable, "-m", "pixlocal.cli.app", "chat", "--max-tokens", "5000",
              "--dtype", "float32"], env)
    try:
        t.wait_for(lambda s: ">>> " in s, "the prompt")
        t.keys(f"/image {sample_png}", "Enter")
        t.wait_for(lambda s: "attached" in s, "/image")
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
