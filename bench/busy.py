"""Decode and prefill quiet and with one core kept busy by another program, alternating.

Each round runs every contestant twice, on a quiet machine and beside a background process
that spins on one core (as a browser tab, a compile or a second model would), in alternating
order, and reports medians, busy/quiet ratios and ratios between contestants. Contestants:

- ours: `pixlocal bench MODEL -p P -n N -r 1 --json` (the pixlocal on PATH, or --pixlocal);
- base: the same with another pixlocal executable (--base, e.g. a checkout of the previous
  commit with its own venv), for before/after figures in the same rounds;
- llama: `llama-bench -m GGUF -p P -n N -r 1 -o json` (--llama-bench and --gguf; its default
  thread count, as its users run it).

    python bench/busy.py /work/big/nemo8-q4 --gguf /work/big/nemo8-q4_0.gguf \\
        --llama-bench /work/llamacpp/src/build/bin/llama-bench --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def busy_core(on: bool):
    """A process spinning on one core while the block runs (nothing when `on` is false)."""
    if not on:
        yield
        return
    p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # scheduled and spinning before the measurement starts
    try:
        yield
    finally:
        p.kill()
        p.wait()


def run_pixlocal(exe: str, model: str, p: int, n: int, extra: list[str]) -> dict:
    r = subprocess.run([exe, "bench", model, "-p", str(p), "-n", str(n), "-r", "1", "--json",
                        *extra], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{exe} bench failed: {r.stderr.strip()[-500:]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"pp": d["prefill_tps"], "tg": d["decode_tps"], "threads": d.get("threads"),
            "prefill_threads": d.get("prefill_threads")}


def run_llama(exe: str, gguf: str, p: int, n: int) -> dict:
    r = subprocess.run([exe, "-m", gguf, "-p", str(p), "-n", str(n), "-r", "1", "-o", "json"],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {r.stderr.strip()[-500:]}")
    out = {"threads": None}
    for t in json.loads(r.stdout):
        out["pp" if t["n_prompt"] else "tg"] = t["avg_ts"]
        out["threads"] = t.get("n_threads")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="pixlocal model directory (e.g. the 8-layer Nemo int4)")
    ap.add_argument("-p", type=int, default=64, help="prompt tokens (default 64)")
    ap.add_argument("-n", type=int, default=64, help="decoded tokens (default 64)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pixlocal", default="pixlocal", help="our executable")
    ap.add_argument("--base", help="a second pixlocal executable (before/after)")
    ap.add_argument("--gguf", help="the same shapes as a GGUF, for llama.cpp")
    ap.add_argument("--llama-bench", help="llama.cpp's llama-bench executable")
    ap.add_argument("--json", type=Path, help="write every run and the summary here")
    ap.add_argument("--quiet-only", action="store_true",
                    help="no busy runs: a plain before/after A/B (with --base)")
    a = ap.parse_args()

    contestants = {"ours": lambda: run_pixlocal(a.pixlocal, a.model, a.p, a.n, [])}
    if a.base:
        contestants["base"] = lambda: run_pixlocal(a.base, a.model, a.p, a.n, [])
    if a.gguf and a.llama_bench:
        contestants["llama"] = lambda: run_llama(a.llama_bench, a.gguf, a.p, a.n)
    runs: list[dict] = []
    for rnd in range(a.rounds):
        order = list(contestants)
        if rnd % 2:
            order.reverse()
        conds = [False] if a.quiet_only else [False, True] if rnd % 2 == 0 else [True, False]
        for name in order:
            for busy in conds:
                with busy_core(busy):
                    r = contestants[name]()
                r.update(round=rnd, who=name, busy=busy)
                runs.append(r)
                print(f"round {rnd} {name:5s} {'busy ' if busy else 'quiet'} "
                      f"pp {r['pp']:8.2f}  tg {r['tg']:7.2f} tok/s  threads {r['threads']}"
                      f"{' (prefill %s)' % r['prefill_threads'] if r.get('prefill_threads') else ''}",
                      flush=True)

    def med(who: str, busy: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["who"] == who and r["busy"] == busy)

    conditions = ("quiet",) if a.quiet_only else ("quiet", "busy")
    summary = {}
    for name in contestants:
        s = {f"{k}_{c}": round(med(name, c == "busy", k), 2)
             for k in ("pp", "tg") for c in conditions}
        if not a.quiet_only:
            s["tg_busy_over_quiet"] = round(s["tg_busy"] / s["tg_quiet"], 3)
            s["pp_busy_over_quiet"] = round(s["pp_busy"] / s["pp_quiet"], 3)
        summary[name] = s
    for other in ("base", "llama"):
        if other in summary:
            for c in conditions:
                pairs = [(x, y) for x in runs for y in runs if x["who"] == "ours"
                         and y["who"] == other and x["round"] == y["round"]
                         and x["busy"] == y["busy"] == (c == "busy")]
                summary[f"ours_over_{other}_tg_{c}"] = round(statistics.median(
                    x["tg"] / y["tg"] for x, y in pairs), 3)
                summary[f"ours_over_{other}_pp_{c}"] = round(statistics.median(
                    x["pp"] / y["pp"] for x, y in pairs), 3)
    print(json.dumps(summary, indent=1))
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "runs": runs,
                                      "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()
