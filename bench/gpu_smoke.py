"""What a GPU must show, in one command and one JSON report (under 5 minutes on any NVIDIA GPU).

    python bench/gpu_smoke.py [--layers 8] [--out report.json]   # on a CUDA machine
    python bench/gpu_smoke.py --dry-run                          # anywhere: CI runs this

Checks, each a key of the report's "checks" (ok, figures, or the error in one line):
  pytest_gpu   `pytest -m gpu`: the tests that need CUDA.
  parity       the tiny model (int4) on the GPU, whole (`gpu_layers` all) and split
               (`gpu_layers=1`), against the CPU path: logits, greedy tokens where the CPU's
               top-1 margin exceeds the logit error, every KV buffer on its layer's device.
  memory       the largest image, a second image on the cached prefix, a near-context text
               prompt: peak GPU memory (torch.cuda.max_memory_allocated) against the plan's
               GPU bytes, under sdpa_kernel([FLASH, EFFICIENT, CUDNN]) so that attention
               falling back to the math kernel fails loudly.
  bench        a synthetic Pixtral-12B-shaped int4 model of --layers decoder layers through
               `pixlocal bench --json`: decode tok/s, bytes/token, effective bandwidth as a
               fraction of the card's peak (its spec where known, else a measured copy).

--dry-run runs all of it on the CPU: the cuda backend's CPU twins stand in for the GPU (the
loader's test hooks put "the GPU side" of a plan on the CPU), the memory meter is the
process's resident high-water mark (peak above the loaded model, against the plan's
activations + KV cache), and the bench model is the tiny one. Exit status 0 when every check
passed. Never run by the test suite except as `--dry-run` (tests/test_gpu_smoke.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30

# Peak memory bandwidth by marketing name, GB/s (vendor data sheets); the first match wins.
SPEC_GBPS = [
    ("H200", 4800), ("H100 SXM", 3350), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB", 1935), ("A100", 1555), ("L40S", 864), ("L40", 864),
    ("L4", 300), ("A10G", 600), ("A10", 600), ("RTX 5090", 1792), ("RTX 5080", 960),
    ("RTX 4090", 1008), ("RTX 4080", 717), ("RTX 4070 Ti", 504), ("RTX 4070", 504),
    ("RTX 4060 Ti", 288), ("RTX 4060", 272), ("RTX 3090 Ti", 1008), ("RTX 3090", 936),
    ("RTX 3080 Ti", 912), ("RTX 3080", 760), ("RTX 3070", 448), ("RTX 3060", 360),
    ("RTX 2080 Ti", 616), ("RTX 2080", 448), ("RTX 2070", 448), ("RTX 2060", 336),
    ("TITAN RTX", 672), ("T4", 320), ("V100", 900), ("P100", 732), ("GTX 1080 Ti", 484),
    ("GTX 1080", 320), ("GTX 1070", 256), ("GTX 1660", 192),
]


def spec_gbps(name: str) -> float | None:
    for key, gbps in SPEC_GBPS:
        if key.lower() in name.lower():
            return float(gbps)
    return None


def log(msg: str) -> None:
    print(f"[gpu_smoke {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Env:
    """Where "the GPU" is: a CUDA device, or (dry run) the CPU with the cuda backend's twins."""

    def __init__(self, dry_run: bool) -> None:
        self.dry = dry_run
        if not dry_run and not torch.cuda.is_available():
            raise SystemExit("gpu_smoke: no CUDA device here (torch.cuda.is_available() is "
                             "False); run with --dry-run to check the script on the CPU")
        self.device = torch.device("cpu" if dry_run else "cuda")

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dry_run": self.dry, "torch": torch.__version__,
                             "cuda": torch.version.cuda, "hip": torch.version.hip}
        if self.dry:
            d["device"] = "cpu (the cuda backend's CPU twins stand in)"
        else:
            p = torch.cuda.get_device_properties(0)
            d.update(device=p.name, capability=f"{p.major}.{p.minor}",
                     total_memory=p.total_memory, multiprocessors=p.multi_processor_count)
        return d

    def load(self, path: Path, gpu_layers: int | str, context_len: int, dtype: str) -> Any:
        """A runner with `gpu_layers` decoder layers (and what the plan adds) on the GPU."""
        import pixlocal
        if not self.dry:
            return pixlocal.load(path, device="cuda", dtype=dtype, gpu_layers=gpu_layers,
                                 context_len=context_len)
        from pixlocal import loader
        from pixlocal.checkpoint import tokenizer_path
        from pixlocal.generate import Pixtral
        from pixlocal.prompt import PromptEncoder
        loaded = loader.load(path, "cpu", dtype, context_len=context_len, gpu_layers=gpu_layers,
                             gpu="cpu", gpu_free=64 * GiB,
                             backends={"cuda": "cuda", "cpu": "cpu"})
        return Pixtral(loaded, PromptEncoder(tokenizer_path(path, loaded.checkpoint.kind)),
                       path)

    def load_cpu(self, path: Path, dtype: str) -> Any:
        import pixlocal
        return pixlocal.load(path, device="cpu", dtype=dtype)

    def expected_device(self, runner: Any, layer: int) -> torch.device:
        on_gpu = runner.plan.on_gpu(f"layers.{layer}")
        return self.device if on_gpu else torch.device("cpu")

    @contextlib.contextmanager
    def fused_attention_only(self) -> Iterator[None]:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.CUDNN_ATTENTION]):
            yield

    def sync(self) -> None:
        if not self.dry:
            torch.cuda.synchronize()


class Meter:
    """Peak memory of one request: GPU bytes allocated (absolute, so it includes weights and
    KV cache), or in a dry run the resident high-water mark above its level at start."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.base = 0

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    def start(self) -> None:
        if self.env.dry:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = self._status("VmRSS")
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        if self.env.dry:
            return self._status("VmHWM") - self.base
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def budget(self, runner: Any) -> int:
        """What the plan allows the meter to read."""
        plan = runner.plan
        if self.env.dry:
            return plan.activations + plan.kv_per_layer * plan.n_layers
        return int(plan.gpu_bytes)


# ---- models ---------------------------------------------------------------------------------

def tiny_model(work: Path) -> Path:
    from pixlocal.quant import quantize_checkpoint

    from pixlocal.config import PixtralArgs
    from pixlocal.synthetic import write_checkpoint
    src, q = work / "tiny", work / "tiny-q4"
    if not q.exists():
        write_checkpoint(src, dataclasses.replace(PixtralArgs.tiny(), n_layers=3),
                         fmt="mistral", dtype=torch.float32, seed=1)
        quantize_checkpoint(src, q, bits=4)
        shutil.rmtree(src)
    return q


def bench_model(env: Env, work: Path, layers: int) -> Path:
    """A Pixtral-12B-shaped int4 model of `layers` decoder layers (the tiny one in a dry run)."""
    if env.dry:
        return tiny_model(work)
    src, q = work / f"nemo{layers}", work / f"nemo{layers}-q4"
    if not q.exists():
        run([sys.executable, "-m", "pixlocal.synthetic", str(src), "--preset", "pixtral-12b",
             "--layers", str(layers), "--vision-layers", "1"], 900)
        run([sys.executable, "-m", "pixlocal.cli.app", "quantize", str(src), str(q)], 900)
        shutil.rmtree(src)
    return q


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    log(" ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{cmd[0]} ... exited {out.returncode}: {tail[0]}")
    return out


# ---- checks ---------------------------------------------------------------------------------

def check_pytest(env: Env, budget: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           str(ROOT / "tests")]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    summary = lines[-1] if lines else out.stderr.strip()[-200:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)",
                                               summary)}
    # 5: nothing collected (a dry run deselects or skips every CUDA test)
    return {"ok": out.returncode in (0, 5) and not counts.get("failed"), "summary": summary,
            **counts, "seconds": round(time.perf_counter() - t0, 1)}


def _messages(image: Path | None, text: str) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image", "image": str(image)})
    return [{"role": "user", "content": content}]


def _compare(env: Env, ref: Any, gpu: Any, msgs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    enc = ref.encode(msgs)
    want_text = list(ref.stream_encoded(enc, max_tokens=n))
    tokens = enc.tokens + [s.token for s in want_text]
    want = ref.logits(tokens, enc.images)
    got = gpu.logits(tokens, enc.images).to(want.device)
    err = float((got - want).abs().max())
    rel = err / float(want.abs().max())
    # positions whose next token was generated: the CPU's choice must win on the GPU wherever
    # its margin over the runner-up exceeds twice the largest logit error seen
    gen = want[len(enc.tokens) - 1 : -1]
    top2 = gen.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * err
    agree = got[len(enc.tokens) - 1 : -1].argmax(-1) == gen.argmax(-1)
    gpu.reset()
    free_run = [s.token for s in gpu.stream_encoded(enc, max_tokens=n)]
    kv = gpu.cache.kv
    wrong = [i for i in range(gpu.args.n_layers)
             if kv is None or kv.k[i].device.type != env.expected_device(gpu, i).type
             or kv.v[i].device.type != env.expected_device(gpu, i).type]
    return {"ok": rel < 3e-2 and bool(agree[clear].all()) and not wrong,
            "logits_rel_err": round(rel, 5), "tokens_clear": int(clear.sum()),
            "tokens_clear_agree": int(agree[clear].sum()),
            "greedy_equal": free_run == tokens[len(enc.tokens):],
            "gpu_layers": gpu.plan.gpu_layers, "kv_wrong_device_layers": wrong}


def check_parity(env: Env, work: Path, image: Path) -> dict[str, Any]:
    path = tiny_model(work)
    ref = env.load_cpu(path, "float32")
    dtype = "float32" if env.dry else "auto"
    out: dict[str, Any] = {}
    for name, layers in (("whole", "auto"), ("split", 1)):
        gpu = env.load(path, layers, 4096, dtype)
        out[name] = _compare(env, ref, gpu, _messages(image, "What is in this picture?"), 12)
        del gpu
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def check_memory(env: Env, path: Path, images: list[Path], context_len: int) -> dict[str, Any]:
    runner = env.load(path, "auto", context_len, "float32" if env.dry else "auto")
    meter = Meter(env)
    budget = meter.budget(runner)
    out: dict[str, Any] = {"plan_bytes": budget, "context_len": runner.context_limit,
                           "prefill_chunk": runner.prefill_chunk}
    first = _messages(images[0], "Describe this picture.")
    gen = torch.Generator().manual_seed(0)
    n = runner.context_limit - 8
    long_tokens = [1] + torch.randint(1000, 100000, (n - 1,), generator=gen).tolist()
    from pixlocal.prompt import Encoded
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("largest_image", lambda: runner.encode(first)),
        ("second_image_cached_prefix", lambda: runner.encode(
            first + [{"role": "assistant", "content": "A picture."}]
            + _messages(images[1], "And this one?"))),
        ("near_context_text", lambda: Encoded(long_tokens, [])),
    ]
    with env.fused_attention_only():
        for name, make in cases:
            enc = make()
            encoded = runner.images_encoded
            meter.start()
            t0 = time.perf_counter()
            steps = list(runner.stream_encoded(enc, max_tokens=2))
            env.sync()
            peak = meter.peak()
            out[name] = {"ok": peak <= budget, "peak_bytes": peak,
                         "prompt_tokens": len(enc.tokens),
                         "prefilled_tokens": steps[0].prefilled_tokens if steps else 0,
                         "images_encoded": runner.images_encoded - encoded,
                         "seconds": round(time.perf_counter() - t0, 2)}
    cached = out["second_image_cached_prefix"]
    cached["ok"] = cached["ok"] and cached["images_encoded"] == 1
    out["ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def copy_gbps(env: Env) -> float:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer (256 MiB dry)."""
    n = (256 if env.dry else 1024) << 20
    a = torch.empty(n, dtype=torch.uint8, device=env.device)
    b = torch.empty_like(a)
    b.copy_(a)
    env.sync()
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    env.sync()
    return 2 * 5 * n / (time.perf_counter() - t0) / 1e9


def check_bench(env: Env, path: Path) -> dict[str, Any]:
    args = ["-p", "16", "-n", "8", "-r", "1"] if env.dry else ["-p", "512", "-n", "64", "-r", "2"]
    dev = "cpu" if env.dry else "cuda"
    out = run([sys.executable, "-m", "pixlocal.cli.app", "bench", str(path), "--json",
               "--device", dev, *args], 600)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    measured = copy_gbps(env)
    spec = None if env.dry else spec_gbps(torch.cuda.get_device_properties(0).name)
    peak = spec or measured
    eff = float(r.get("effective_gbps") or 0)
    return {"ok": r.get("decode_tps", 0) > 0 and r.get("decode_bytes_per_token", 0) > 0,
            "model": str(path), "device": r.get("device"), "decode_tps": r.get("decode_tps"),
            "prefill_tps": r.get("prefill_tps"),
            "decode_bytes_per_token": r.get("decode_bytes_per_token"),
            "effective_gbps": eff, "peak_gbps": round(peak, 1),
            "peak_from": "spec" if spec else "measured copy",
            "copy_gbps": round(measured, 1), "fraction_of_peak": round(eff / peak, 3)}


def picture(path: Path, w: int, h: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="run every check on the CPU (the cuda backend's CPU twins)")
    ap.add_argument("--layers", type=int, default=8,
                    help="decoder layers of the 12B-shaped bench model (40: the whole model)")
    ap.add_argument("--work", type=Path, help="keep models here (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="also write the report here")
    ap.add_argument("--skip", action="append", default=[],
                    choices=["pytest_gpu", "parity", "memory", "bench"])
    a = ap.parse_args(argv)
    env = Env(a.dry_run)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"env": env.describe(), "checks": {}}
    tmp = None if a.work else tempfile.TemporaryDirectory(prefix="gpu_smoke-")
    work = a.work or Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    try:
        big = picture(work / "big.png", 1024, 1024, 0)
        other = picture(work / "other.png", 800, 600, 1)
        small = picture(work / "small.png", 160, 120, 2)
        checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("pytest_gpu", lambda: check_pytest(env, 240)),
            ("parity", lambda: check_parity(env, work, small)),
            ("memory", lambda: check_memory(
                env, bench_model(env, work, a.layers), [big, other],
                6144 if env.dry else 32768)),
            ("bench", lambda: check_bench(env, bench_model(env, work, a.layers))),
        ]
        for name, fn in checks:
            if name in a.skip:
                continue
            log(f"{name} ...")
            t0 = time.perf_counter()
            try:
                res = fn()
            except Exception as e:  # a check that breaks is a failed check, reported
                res = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0],
                       "where": traceback.format_exc().strip().splitlines()[-3:]}
            res.setdefault("seconds", round(time.perf_counter() - t0, 1))
            report["checks"][name] = res
            log(f"{name}: {'ok' if res['ok'] else 'FAILED'}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PIXLOCAL_VERIFY", "0")  # fresh synthetic shards: nothing to check
    sys.exit(main())
