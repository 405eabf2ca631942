"""What `pixlocal serve` adds over the model itself: time to first token and decode tokens/s
through the server (a streamed chat completion on loopback, timed by the client) against the
same model in this process, taking the path `pixlocal ask` takes (load_image → encode →
Pixtral.stream_encoded), A/B alternating, medians and ratios. Never run by CI.

    python bench/serve_overhead.py -m /work/big/nemo8-q4 --image examples/photo.jpg \\
        --rounds 10 --max-tokens 48 [--threads 2] [--json out.json]

Both sides count from before the image is decoded (the server's side also has the HTTP
request, JSON and base64; the data URI is made once, outside the clock, as a client holds its
image). Each request starts with a text unique to it, before the image, so nothing is reused
from the prompt cache on either side: every first token includes the whole prefill and the
vision encoder. Decode tokens/s is (tokens - 1) over the time from the first token to the last
(the server's: the first content chunk to the chunk with finish_reason). The server runs as a
subprocess with the same options; the two models never run at once.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pixlocal.cli.common import compile_kernels

import pixlocal
from pixlocal.images import load_image


def start_server(model: str, opts: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "pixlocal.cli.app", "serve", "-m", model, "--port", "0", *opts]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    port = int(m.group(1))
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        if status == 200:
            return proc, port
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not get ready:\n{log.read_text()}")
        time.sleep(0.2)


def messages(tag: str, image: Any, prompt: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": tag}, image,
                                         {"type": "text", "text": prompt}]}]


def in_process(m: Any, path: str, tag: str, prompt: str, max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    enc = m.encode(messages(tag, {"type": "image", "image": load_image(path)}, prompt))
    first = last = None
    n = 0
    for _ in m.stream_encoded(enc, max_tokens=max_tokens, temperature=0.0):
        last = time.perf_counter()
        first = first or last
        n += 1
    assert first is not None and last is not None
    return {"ttft_s": first - t0, "tok_s": (n - 1) / (last - first) if n > 1 else 0.0,
            "tokens": n, "prompt_tokens": len(enc.tokens)}


def through_server(port: int, uri: str, tag: str, prompt: str, max_tokens: int
                   ) -> dict[str, float]:
    body = json.dumps({"model": MODEL_ID, "stream": True, "temperature": 0,
                       "max_tokens": max_tokens, "stream_options": {"include_usage": True},
                       "messages": messages(tag, {"type": "image_url",
                                                  "image_url": {"url": uri}}, prompt)})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body.encode(),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"HTTP {r.status}: {r.read().decode()}")
    first = last = None
    use: dict[str, Any] = {}
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: {"):
            continue
        d = json.loads(line[6:])
        now = time.perf_counter()
        if d.get("usage"):
            use = d["usage"]
        for c in d["choices"]:
            if c["delta"].get("content") and first is None:
                first = now
            if c["finish_reason"]:
                last = now
    conn.close()
    assert first is not None and last is not None and use
    n = use["completion_tokens"]
    return {"ttft_s": first - t0, "tok_s": (n - 1) / (last - first) if n > 1 else 0.0,
            "tokens": n, "prompt_tokens": use["prompt_tokens"]}


MODEL_ID = ""


def main() -> None:
    global MODEL_ID
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--image", default=str(Path(__file__).parent.parent / "examples" /
                                           "photo.jpg"))
    ap.add_argument("--prompt", default="Describe this picture.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, help="fix the CPU threads on both sides (default: "
                    "each side's thread policy, which on a shared machine picks per request)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_overhead.{os.getpid()}.log"
    threads = ["--threads", str(a.threads)] if a.threads else []
    proc, port = start_server(a.model, ["--dtype", a.dtype, *threads], log)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/v1/models")
        MODEL_ID = json.loads(conn.getresponse().read())["data"][0]["id"]
        conn.close()
        t0 = time.perf_counter()
        m = pixlocal.load(a.model, dtype=a.dtype, threads=a.threads)
        compile_kernels(m)
        print(f"loaded in-process in {time.perf_counter() - t0:.1f} s; server on port {port}",
              file=sys.stderr)
        mime = "image/png" if a.image.lower().endswith(".png") else "image/jpeg"
        uri = f"data:{mime};base64," + base64.b64encode(Path(a.image).read_bytes()).decode()
        # one unmeasured request each: first-call costs (allocations, thread probes) out
        in_process(m, a.image, "warm-up A", a.prompt, 4)
        through_server(port, uri, "warm-up B", a.prompt, 4)
        rows: list[dict[str, Any]] = []
        for i in range(a.rounds):
            order = ("A", "B") if i % 2 == 0 else ("B", "A")
            for side in order:
                tag = f"Round {i} {side}."
                r = (in_process(m, a.image, tag, a.prompt, a.max_tokens) if side == "A" else
                     through_server(port, uri, tag, a.prompt, a.max_tokens))
                rows.append({"round": i, "side": side, **r})
                print(f"round {i} {'in-process' if side == 'A' else 'server    '}: TTFT "
                      f"{r['ttft_s']:.3f} s, {r['tok_s']:.2f} tok/s ({r['tokens']} tokens, "
                      f"{r['prompt_tokens']} prompt)", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(30)

    def med(side: str, key: str) -> float:
        return statistics.median(r[key] for r in rows if r["side"] == side)

    out = {"model": a.model, "image": a.image, "rounds": a.rounds, "max_tokens": a.max_tokens,
           "threads": a.threads,
           "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, cwd=Path(__file__).parent).stdout.strip(),
           "torch": __import__("torch").__version__, "rows": rows}
    def paired(key: str) -> float:  # the same round's two runs: robust to a drifting load
        by = {(r["round"], r["side"]): r[key] for r in rows}
        return statistics.median(by[i, "B"] / by[i, "A"] for i in range(a.rounds))

    for key in ("ttft_s", "tok_s"):
        a_, b_ = med("A", key), med("B", key)
        out[key] = {"in_process": a_, "server": b_, "server_over_in_process": b_ / a_,
                    "paired_median_ratio": paired(key)}
    t, d = out["ttft_s"], out["tok_s"]
    print(f"median TTFT: in-process {t['in_process']:.3f} s, server {t['server']:.3f} s "
          f"(x{t['server_over_in_process']:.3f}; per round, median "
          f"x{t['paired_median_ratio']:.3f})")
    print(f"median decode: in-process {d['in_process']:.2f} tok/s, server {d['server']:.2f} "
          f"tok/s (x{d['server_over_in_process']:.3f}; per round, median "
          f"x{d['paired_median_ratio']:.3f})")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
