"""`pixlocal pull` against a local stand-in for the hub (HF_ENDPOINT, read by huggingface_hub
at import time, so pull runs in a subprocess): progress, resume after a dropped connection,
the gated / 401 / 404 / offline messages, then quantization."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import cli_fixtures

from pixlocal.config import home

tiny_registry = cli_fixtures.tiny_registry  # a fixture
FILES = cli_fixtures.FILES
hub = cli_fixtures.hub  # a fixture: the tiny model served as acme/big


def pull(endpoint: str, *args: str, token: str | None = None, tmp=None):
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "pixlocal.cli.app", "pull", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def error_line(r) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_pull_downloads_with_progress_and_resumes_a_dropped_connection(
        tiny_registry, tiny_ckpt, hub, tmp_path):
    hub.drop_once.add("consolidated.safetensors")
    r = pull(hub.endpoint, "big", "--quant", "none", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    dest = home() / "big"
    assert r.stdout == f"{dest}\n"  # stdout: the model directory, nothing else
    for f in FILES:
        assert (dest / f).read_bytes() == (tiny_ckpt / f).read_bytes(), f
    ranges = [rng for m, p, rng in hub.log
              if m == "GET" and p.endswith("consolidated.safetensors")]
    size = (tiny_ckpt / "consolidated.safetensors").stat().st_size
    assert len(ranges) == 2 and ranges[0] is None  # the first GET was cut half-way, then
    assert 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= size // 2  # it resumed
    assert "consolidated.safetensors (2/3)" in r.stderr and "100%" in r.stderr  # progress
    # a second pull finds the files there and downloads nothing again
    n_gets = sum(m == "GET" for m, _, _ in hub.log)
    r = pull(hub.endpoint, "b", "--quant", "none", tmp=tmp_path)
    assert r.returncode == 0 and sum(m == "GET" for m, _, _ in hub.log) == n_gets


def test_pull_then_quantize(tiny_registry, hub, tmp_path):
    r = pull(hub.endpoint, "big", tmp=tmp_path)  # the default variant is int4
    assert r.returncode == 0, r.stderr
    out = home() / "big-int4"
    assert r.stdout == f"{out}\n" and "quantized" in r.stderr
    from pixlocal.cli.registry import quant_of, resolve
    assert quant_of(out).startswith("int4") and resolve("big").path == out


def test_gated_repo(tiny_registry, hub, tmp_path):
    hub.gated.add("acme/big")
    hub.valid_tokens |= {"hf_ok", "hf_approved"}
    hub.approved.add("hf_approved")
    line = error_line(pull(hub.endpoint, "big", "--quant", "none", tmp=tmp_path))
    assert "acme/big is gated" in line and "HF_TOKEN" in line
    line = error_line(pull(hub.endpoint, "big", "--quant", "none", "--token", "hf_ok",
                           tmp=tmp_path))
    assert "gated" in line and "no access yet" in line
    r = pull(hub.endpoint, "big", "--quant", "none", token="hf_approved", tmp=tmp_path)
    assert r.returncode == 0, r.stderr  # HF_TOKEN from the environment is used


def test_bad_token_not_found_and_offline(tiny_registry, hub, tmp_path):
    line = error_line(pull(hub.endpoint, "big", "--quant", "none", "--token", "hf_bad",
                           tmp=tmp_path))
    assert "refused the Hugging Face token (401" in line
    del hub.repos["acme/big"]["tekken.json"]
    line = error_line(pull(hub.endpoint, "big", "--quant", "none", tmp=tmp_path))
    assert "acme/big: file tekken.json not found" in line
    hub.repos.clear()
    line = error_line(pull(hub.endpoint, "big", "--quant", "none", tmp=tmp_path))
    assert "acme/big: repository not found" in line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    line = error_line(pull(closed, "big", "--quant", "none", tmp=tmp_path))
    assert "cannot reach" in line and "offline" in line


def test_pull_usage_and_unknown(tiny_registry, tmp_path):
    assert pull("http://127.0.0.1:9", "big", "--quant", "int3", tmp=tmp_path).returncode == 2
    line = error_line(pull("http://127.0.0.1:9", "nope", tmp=tmp_path))
    assert "unknown model 'nope'" in line and "models.toml" in line
