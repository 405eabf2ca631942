"""`pixlocal serve` over real HTTP. One server per module: `pixlocal serve` as a subprocess on
a free loopback port with the tiny model, driven with the official `openai` client and, where
the bytes matter (bad input, disconnects), with http.client. The last test stops it with
SIGTERM; the fixture makes sure it is gone."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import cli_fixtures  # noqa: E402
from pixlocal.cli import openai_api as api  # noqa: E402
from pixlocal.cli.app import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

tiny_registry = cli_fixtures.tiny_registry  # a fixture

KEY = "sk-test-key"
CONTEXT = 2048  # the server's context window: an over-long prompt is cheap to make
MAX_QUEUE = 8
STARTUP_S = 300.0  # the first start on a fresh machine compiles the CPU kernels (15-60 s)
HANG_UP_SLACK = 50  # tokens a job may make after its client hung up: the worker stops at the
# first token after the event loop reads the disconnect (measured: 1-3 tokens per hang-up)
RSS_SLACK_MIB = 48  # RSS after a burst vs before it: measured +0-1 MiB on a 2-core VM; the
# slack leaves room for glibc arenas of the prep, worker and event-loop threads


@dataclass
class Srv:
    proc: subprocess.Popen
    port: int
    log_path: Path
    startup: list[int] = field(default_factory=list)  # /health statuses seen while starting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0,
                             timeout=60)


def call(srv: Srv, method: str, path: str, body: object = None, key: str | None = KEY,
         headers: dict | None = None) -> tuple[int, http.client.HTTPResponse, object]:
    """One raw request: (status, response, parsed JSON body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    h = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if r.getheader("Content-Type", "").startswith("text/event-stream"):
        return r.status, r, data.decode()
    return r.status, r, json.loads(data) if data else None


def health(srv: Srv) -> dict:
    status, _, body = call(srv, "GET", "/health", key=None)
    assert status == 200, body
    return body


def wait_health(srv: Srv, ok, timeout: float = 10.0) -> dict:
    """/health once `ok(health)` holds (the counters change just after a client's last byte)."""
    deadline = time.monotonic() + timeout
    while not ok(h := health(srv)):
        assert time.monotonic() < deadline, h
        time.sleep(0.02)
    return h


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_ckpt):
    d = tmp_path_factory.mktemp("serve")
    cli_fixtures.write_registry(d / "models.toml", tiny_ckpt)
    env = {**os.environ, "PIXLOCAL_MODELS_TOML": str(d / "models.toml"),
           "PIXLOCAL_HOME": str(d / "home")}
    env.pop("PIXLOCAL_DEBUG", None)
    log_path = d / "server.log"
    cmd = [sys.executable, "-m", "pixlocal.cli.app", "serve", "-m", "tiny", "--port", "0",
           "--api-key", KEY, "--dtype", "float32", "--context", str(CONTEXT),
           "--max-queue", str(MAX_QUEUE), "--max-body", "1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    srv = Srv(proc, 0, log_path)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", srv.log())):
            assert proc.poll() is None and time.monotonic() < deadline, srv.log()
            time.sleep(0.02)
        srv.port = int(m.group(1))
        while True:
            status, _, body = call(srv, "GET", "/health", key=None)
            srv.startup.append(status)
            if status == 200:
                break
            assert status == 503 and body["status"] == "loading", (status, body)
            assert proc.poll() is None and time.monotonic() < deadline, srv.log()
            time.sleep(0.02)
        yield srv
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def noise_png(seed: int) -> bytes:
    """A picture no other test sends (so its vision-encoder run is this test's)."""
    return png(np.random.default_rng(seed).integers(0, 255, (40, 56, 3), dtype=np.uint8))


def user(*parts: dict | str) -> dict:
    return {"role": "user", "content": [p if isinstance(p, dict) else
                                        {"type": "text", "text": p} for p in parts]}


def prompt_tokens(tiny_ckpt: Path, messages: list[dict]) -> int:
    """The prompt's token count, from pixlocal's own encoder (mistral-common's template)."""
    from pixlocal.prompt import PromptEncoder
    msgs = json.loads(json.dumps(messages))
    for m in msgs:
        for p in m["content"] if isinstance(m["content"], list) else []:
            if p["type"] == "image_url":
                p["image_url"] = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
    return len(PromptEncoder(tiny_ckpt / "tekken.json").encode(msgs).tokens)


def png_bomb(side: int = 30_000) -> bytes:
    """A 1 KB PNG that claims side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                         zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 100_000)) + chunk(b"IEND", b""))


# ---- startup, discovery ------------------------------------------------------------------

def test_health_answers_503_while_loading_then_200(server):
    assert server.startup[-1] == 200
    assert 503 in server.startup, "the server was never seen loading"
    h = health(server)
    assert h["status"] == "ok" and h["queued"] == 0


def test_models_lists_the_registry_name_and_aliases(server):
    ids = [m.id for m in server.client().models.list()]
    assert ids[0] == "tiny:f32" and {"tiny", "t"} <= set(ids)


# ---- answers -------------------------------------------------------------------------------

def test_same_text_as_ask_at_temperature_0(server, tiny_registry, sample_png, tiny_ckpt):
    r = CliRunner().invoke(app, ["ask", str(sample_png), "Caption this.", "-m", "tiny",
                                 "--max-tokens", "8", "--temp", "0", "--dtype", "float32",
                                 "--json"])
    assert r.exit_code == 0, r.stderr
    asked = json.loads(r.stdout)
    msgs = [user(image_part(sample_png.read_bytes()), "Caption this.")]
    out = server.client().chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                                  temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == asked["text"] and asked["text"]
    assert out.choices[0].finish_reason == asked["finish_reason"] == "length"
    assert out.usage.prompt_tokens == asked["prompt_tokens"] == prompt_tokens(tiny_ckpt, msgs)
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_streamed_answer_matches_the_non_streamed_one(server, sample_png, tiny_ckpt):
    c = server.client()
    msgs = [{"role": "system", "content": "Answer briefly."},
            user(image_part(sample_png.read_bytes()), "What is it?")]
    whole = c.chat.completions.create(model="t", messages=msgs, max_tokens=6, temperature=0)
    chunks = list(c.chat.completions.create(model="t", messages=msgs, max_tokens=6,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens \
        == prompt_tokens(tiny_ckpt, msgs)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stream_ends_with_done_on_the_wire(server, sample_png):
    body = {"model": "tiny", "max_tokens": 3, "temperature": 0, "stream": True,
            "messages": [user(image_part(sample_png.read_bytes()), "Hi")]}
    status, r, text = call(server, "POST", "/v1/chat/completions", body)
    assert status == 200 and r.getheader("Cache-Control") == "no-cache"
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    assert all(e.startswith("data: {") for e in events[:-2])
    final = json.loads(events[-3][6:])
    assert final["choices"][0]["finish_reason"] == "length" and "usage" not in final


def test_follow_up_turn_runs_no_vision_encoder(server, tiny_ckpt):
    c = server.client()
    turn1 = [user(image_part(noise_png(7)), "Describe the picture.")]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=turn1,
                                                       max_tokens=5, temperature=0)
    first = raw.parse()
    assert raw.headers["x-pixlocal-images-encoded"] == "1"
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     user("And its colours?")]
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=turn2,
                                                       max_tokens=5, temperature=0)
    second = raw.parse()
    assert raw.headers["x-pixlocal-images-encoded"] == "0"  # the image came from the cache
    n1, n2 = first.usage.prompt_tokens, second.usage.prompt_tokens
    assert n2 == prompt_tokens(tiny_ckpt, turn2) > n1
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= n1 and int(raw.headers["x-pixlocal-cached-tokens"]) == cached
    # the follow-up computed only what turn 1 did not leave in the cache
    assert n2 - cached <= (n2 - n1) + first.usage.completion_tokens


def test_stop_strings_seed_and_max_completion_tokens(server, sample_png):
    c = server.client()
    msgs = [user(image_part(sample_png.read_bytes()), "Caption this.")]
    full = c.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                     max_completion_tokens=8, max_tokens=3)
    text = full.choices[0].message.content
    assert full.usage.completion_tokens == 8  # max_completion_tokens wins over max_tokens
    stop = text[len(text) // 2:][:3]
    cut = c.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=8,
                                    stop=[stop, "never appears"])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(model="tiny", messages=msgs, temperature=0,
                                         max_tokens=8, stop=stop, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == \
        text[:text.index(stop)]
    a, b = (c.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, top_p=0.9,
                                      seed=1234, max_tokens=6).choices[0].message.content
            for _ in range(2))
    assert a == b


# ---- bad input ------------------------------------------------------------------------------

def chat(**kw) -> dict:
    return {"model": "tiny", "max_tokens": 2,
            "messages": [user(image_part(noise_png(1)), "Caption this.")], **kw}


def with_part(part: dict) -> dict:
    return chat(messages=[user(part, "What is it?")])


BAD = [  # (id, body, status, code, param)
    ("malformed-json", b'{"model": "tiny", "messages": [', 400, "invalid_json", None),
    ("not-utf8", b'{"model": "\xff"}', 400, "invalid_json", None),
    ("deep-json", b"[" * 100_000, 400, "invalid_json", None),
    ("not-an-object", [], 400, None, None),
    ("missing-messages", {"model": "tiny"}, 400, None, "messages"),
    ("empty-messages", chat(messages=[]), 400, None, "messages"),
    ("missing-model", {"messages": [user("hi")]}, 400, None, "model"),
    ("unknown-model", chat(model="gpt-4o"), 404, "model_not_found", "model"),
    ("unknown-role", chat(messages=[{"role": "tool", "content": "x"}]), 400, None,
     "messages[0].role"),
    ("unknown-part", with_part({"type": "input_audio", "input_audio": {}}), 400, None,
     "messages[0].content[0].type"),
    ("text-part-without-text", with_part({"type": "text"}), 400, None,
     "messages[0].content[0].text"),
    ("image-without-url", with_part({"type": "image_url", "image_url": {}}), 400, None,
     "messages[0].content[0].image_url"),
    ("garbage-base64", with_part({"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@not*base64!!"}}), 400, "invalid_image",
     "messages[0].content[0].image_url"),
    ("not-an-image", with_part({"type": "image_url", "image_url": {
        "url": data_uri(b"hello, I am text")}}), 400, "invalid_image",
     "messages[0].content[0].image_url"),
    ("image-bomb", with_part(image_part(png_bomb())), 413, "image_too_large",
     "messages[0].content[0].image_url"),
    ("remote-url", with_part({"type": "image_url", "image_url": {
        "url": "http://169.254.169.254/latest/meta-data"}}), 400, "image_url_not_allowed",
     "messages[0].content[0].image_url"),
    ("local-path", with_part({"type": "image_url", "image_url": {"url": "/etc/passwd"}}), 400,
     None, "messages[0].content[0].image_url"),
    ("file-uri", with_part({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}),
     400, None, "messages[0].content[0].image_url"),
    ("too-many-images", chat(messages=[user(*[image_part(noise_png(1))] * 9, "hi")]), 400,
     None, "messages"),
    ("image-in-system", chat(messages=[{"role": "system", "content": [
        image_part(noise_png(1))]}, user("hi")]), 400, None, "messages[0].content[0]"),
    ("negative-max-tokens", chat(max_tokens=-5), 400, None, "max_tokens"),
    ("zero-max-tokens", chat(max_tokens=0), 400, None, "max_tokens"),
    ("huge-max-tokens", chat(max_tokens=10**12), 400, None, "max_tokens"),
    ("text-max-tokens", chat(max_tokens="ten"), 400, None, "max_tokens"),
    ("max-tokens-past-context", chat(max_tokens=CONTEXT), 400, "context_length_exceeded",
     "messages"),
    ("over-long-prompt", chat(messages=[user("hello " * (CONTEXT + 100))], max_tokens=None),
     400, "context_length_exceeded", "messages"),
    ("temperature", chat(temperature=7), 400, None, "temperature"),
    ("nan-top-p", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
     b'"top_p": NaN}', 400, None, "top_p"),
    ("stop", chat(stop=[1, 2]), 400, None, "stop"),
    ("n", chat(n=3), 400, "unsupported_parameter", "n"),
    ("tools", chat(tools=[{"type": "function"}]), 400, "unsupported_parameter", "tools"),
    ("stream-not-bool", chat(stream="yes"), 400, None, "stream"),
    ("empty-content", chat(messages=[{"role": "user", "content": ""}]), 400, None,
     "messages"),
    ("last-is-system", chat(messages=[{"role": "system", "content": "x"}]), 400, None,
     "messages"),
]


def check_error(status: int, body: object, want_status: int, code: str | None = None,
                param: str | None = None) -> dict:
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    e = body["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    assert isinstance(e["message"], str) and e["message"] and "\n" not in e["message"]
    assert "Traceback" not in e["message"]
    assert e["type"] == ("invalid_request_error" if want_status < 500 else "server_error")
    if code is not None:
        assert e["code"] == code, e
    if param is not None:
        assert e["param"] == param, e
    return e


@pytest.mark.parametrize("body, status, code, param", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_request_gets_its_status_and_a_json_error(server, body, status, code, param):
    if isinstance(body, dict) and body.get("max_tokens", 0) is None:
        body = {k: v for k, v in body.items() if k != "max_tokens"}
    got, _, answer = call(server, "POST", "/v1/chat/completions", body)
    check_error(got, answer, status, code, param)


def test_openai_client_raises_its_own_errors(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[user("hi")], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context window"):
        c.chat.completions.create(model="tiny", messages=[user("hi " * (CONTEXT + 10))])
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()


@pytest.mark.parametrize("key", [None, "wrong", KEY + "x", ""])
def test_wrong_or_missing_key_is_401_on_every_endpoint_but_health(server, key):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                         ("GET", "/nowhere")]:
        status, _, body = call(server, method, path, chat() if method == "POST" else None,
                               key=key)
        check_error(status, body, 401, "invalid_api_key")
    assert call(server, "GET", "/health", key=key)[0] == 200


def test_body_over_the_limit_is_413(server):
    status, _, body = call(server, "POST", "/v1/chat/completions", b"{",
                           headers={"Content-Length": str(50 * 2**20)})
    check_error(status, body, 413, "request_too_large")
    big = json.dumps(chat(messages=[user("x" * (2**20 + 10))])).encode()

    def pieces():  # chunked: no Content-Length to refuse up front
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=pieces(), encode_chunked=True,
                 headers={"Authorization": f"Bearer {KEY}", "Transfer-Encoding": "chunked"})
    r = conn.getresponse()
    check_error(r.status, json.loads(r.read()), 413, "request_too_large")
    conn.close()


def test_unknown_endpoint_and_method_are_json_errors(server):
    check_error(*call(server, "GET", "/v1/completions")[::2], 404)
    check_error(*call(server, "GET", "/v1/chat/completions")[::2], 405)


def test_server_stays_healthy_after_bad_input(server, sample_png):
    assert health(server)["status"] == "ok"
    out = server.client().chat.completions.create(
        model="tiny", messages=[user(image_part(sample_png.read_bytes()), "Again.")],
        max_tokens=2, temperature=0)
    assert out.usage.completion_tokens == 2
    assert "Traceback" not in server.log() and "ERROR" not in server.log()


# ---- load ---------------------------------------------------------------------------------

def sse_lines(r: http.client.HTTPResponse):
    for raw in r:
        line = raw.decode().strip()
        if line.startswith("data: "):
            yield line[6:]


def stream_client(srv: Srv, body: dict, disconnect: bool, out: dict, barrier) -> None:
    """A streaming client on a raw connection; `disconnect`: hang up after the first words."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=120)
    barrier.wait()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        r = conn.getresponse()
        out["status"] = r.status
        events = []
        for data in sse_lines(r):
            events.append(data)
            if disconnect and len(events) == 2:  # the role chunk, then the first words
                break
        out["events"] = events
    finally:
        conn.close()  # for a disconnecting client: hang up mid-stream


def burst(srv: Srv, n: int, n_disconnect: int, max_tokens: int, hang_up_tokens: int):
    results = [{} for _ in range(n)]
    barrier = threading.Barrier(n)
    threads = []
    for i in range(n):
        hang_up = i < n_disconnect
        body = {"model": "tiny", "stream": True, "temperature": 0,
                "max_tokens": hang_up_tokens if hang_up else max_tokens,
                "messages": [user(image_part(noise_png(100 + i)), f"Client {i}: caption.")]}
        threads.append(threading.Thread(target=stream_client,
                                        args=(srv, body, hang_up, results[i], barrier)))
    for t in threads:
        t.start()
    return threads, results


def test_burst_of_8_streams_with_3_hanging_up(server):
    burst_s = 60.0  # each hang-up asks 1,900 tokens: uncancelled, the three would take longer
    threads, _ = burst(server, 8, 0, 4, 4)  # warm-up: allocate what a burst allocates
    for t in threads:
        t.join(burst_s)
    before = wait_health(server, lambda h: h["admitted"] == 0)
    before_rss = server.rss_mib()
    t0 = time.monotonic()
    threads, results = burst(server, 8, 3, 12, 1900)
    slowest_health = 0.0
    while any(t.is_alive() for t in threads):  # the event loop answers while the model works
        h0 = time.monotonic()
        health(server)
        slowest_health = max(slowest_health, time.monotonic() - h0)
        assert time.monotonic() - t0 < burst_s, "the burst did not finish in time"
        time.sleep(0.05)
    wall = time.monotonic() - t0
    for r in results[3:]:
        assert r["status"] == 200 and r["events"][-1] == "[DONE]", r
        final = json.loads(r["events"][-2])
        assert final["choices"][0]["finish_reason"] in ("length", "stop")
    assert all(r["status"] == 200 for r in results[:3])
    h = wait_health(server, lambda h: h["admitted"] == 0
                    and h["cancelled"] - before["cancelled"] >= 3)
    assert h["cancelled"] - before["cancelled"] == 3, h
    assert h["finished"] - before["finished"] == 5, h
    # the three that hung up were stopped within a few tokens, not after their 1,900
    assert h["tokens"] - before["tokens"] <= 5 * 12 + 3 * HANG_UP_SLACK, h
    assert slowest_health < 2.0, slowest_health
    assert server.rss_mib() <= before_rss + RSS_SLACK_MIB, (before_rss, server.rss_mib())
    assert "Traceback" not in server.log()
    print(f"burst: {wall:.1f} s, {h['tokens'] - before['tokens']} tokens, slowest /health "
          f"{slowest_health * 1000:.0f} ms, RSS "
          f"{before_rss:.0f} -> {server.rss_mib():.0f} MiB")


def test_full_queue_answers_503_with_retry_after(server, sample_png):
    holder: dict = {}
    hold = {"model": "tiny", "stream": True, "temperature": 0, "max_tokens": 1900,
            "messages": [user(image_part(sample_png.read_bytes()), "Caption this.")]}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(hold).encode(),
                 {"Authorization": f"Bearer {KEY}"})
    r = conn.getresponse()
    lines = sse_lines(r)
    next(lines), next(lines)  # running: the role chunk and the first words came
    waiting = [threading.Thread(target=lambda i=i: holder.__setitem__(i, call(
        server, "POST", "/v1/chat/completions", chat(max_tokens=2, temperature=0))))
        for i in range(MAX_QUEUE)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 30
    while health(server)["admitted"] < MAX_QUEUE + 1:
        assert time.monotonic() < deadline, health(server)
        time.sleep(0.02)
    status, resp, body = call(server, "POST", "/v1/chat/completions", chat())
    check_error(status, body, 503, "queue_full")
    assert int(resp.getheader("Retry-After")) >= 1
    conn.close()  # the holder hangs up: the queue drains
    for t in waiting:
        t.join(60)
    assert [holder[i][0] for i in range(MAX_QUEUE)] == [200] * MAX_QUEUE
    wait_health(server, lambda h: h["admitted"] == 0)


# ---- the command ----------------------------------------------------------------------------

def test_without_uvicorn_it_says_how_to_install(tiny_registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    r = CliRunner().invoke(app, ["serve", "-m", "tiny"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: pixlocal serve needs uvicorn, one of pixlocal's dependencies: "
        "pip install 'starlette>=0.37' 'uvicorn>=0.29'"]


def test_bad_model_or_busy_port_is_one_line_before_loading(tiny_registry):
    r = CliRunner().invoke(app, ["serve", "-m", "nosuch"])
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "unknown model 'nosuch'" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = CliRunner().invoke(app, ["serve", "-m", "tiny", "--port", str(s.getsockname()[1])])
    assert r.exit_code == 1 and r.stderr.strip().startswith("error: cannot listen on 127.0.0.1")
    assert len(r.stderr.strip().splitlines()) == 1


def test_stop_text_holds_back_what_may_begin_a_stop_string():
    s = api.StopText(["END", "</s>"])
    assert s.feed("hello E") == ("hello ", False)
    assert s.feed("N") == ("", False)
    assert s.feed("X and <") == ("ENX and ", False)
    assert s.feed("/s> more") == ("", True)
    s = api.StopText([])
    assert s.feed("abc") == ("abc", False) and s.flush() == ""


def test_request_parsing_maps_openai_fields():
    req = api.parse_request({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "hi"}], "top_p": 0, "seed": -1,
        "max_completion_tokens": 5, "stream": True}, ["m"], api.Limits())
    assert req.messages[0] == {"role": "system", "content": "Be brief."}
    assert req.sampling["temperature"] == 0.0 and req.max_tokens == 5  # top_p 0: greedy
    assert 0 <= req.sampling["seed"] < 2**63 and req.stream and not req.include_usage
    ok = api.parse_request({"model": "m", "messages": [user(image_part(b"x"))]}, ["m"],
                           api.Limits(allow_urls=True))
    assert ok.images[0].param == "messages[0].content[0].image_url"


def test_image_urls_are_fetched_only_when_allowed_and_within_limits(tiny_model, sample_png):
    """--allow-image-urls: the preparing step downloads with the size limit (413 above it)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pixlocal.cli.serve_app import prepare
    body = sample_png.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
        msgs = {"model": "m", "max_tokens": 2, "messages": [user({"type": "image_url",
                                                                  "image_url": {"url": url}})]}
        with pytest.raises(api.ApiError) as e:
            api.parse_request(msgs, ["m"], api.Limits())
        assert e.value.status == 400 and e.value.code == "image_url_not_allowed"
        limits = api.Limits(allow_urls=True)
        enc, max_tokens = prepare(tiny_model, api.parse_request(msgs, ["m"], limits), limits)
        assert len(enc.images) == 1 and max_tokens == 2
        small = api.Limits(allow_urls=True, max_image_bytes=len(body) - 1)
        with pytest.raises(api.ApiError) as e:
            prepare(tiny_model, api.parse_request(msgs, ["m"], small), small)
        assert e.value.status == 413 and e.value.param == "messages[0].content[0].image_url"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_sigterm_cancels_the_stream_in_flight_and_exits_0(server, sample_png):
    """Last: it stops the module's server."""
    body = {"model": "tiny", "stream": True, "temperature": 0, "max_tokens": 1900,
            "messages": [user(image_part(sample_png.read_bytes()), "Caption this.")]}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(),
                 {"Authorization": f"Bearer {KEY}"})
    lines = sse_lines(conn.getresponse())
    next(lines), next(lines)
    server.proc.send_signal(signal.SIGTERM)
    rest = list(lines)  # ends soon: cancelled at the next token
    conn.close()
    assert rest and json.loads(rest[-1])["error"]["code"] == "shutting_down", rest[-3:]
    assert server.proc.wait(20) == 0
    log = server.log()
    assert "Traceback" not in log and "Shutting down" in log
