"""Kernel benchmark for the cpu backend (not run by CI).

    python bench/kernels.py [--json OUT.json] [--threads N] [--repeats 9] [--quick]

For each Nemo shape (M x K) and scheme it measures, interleaved in one process with the same
thread count:
  * ours:  the decode kernel (cpu._gemv) called as a decode step calls it (cpu_decode._layer,
           from numba: float32 activations, a reused output) → ms, GB/s of weight bytes
           streamed; `api` is the Python wrapper cpu.gemv around it (bfloat16 input, a fresh
           output tensor): after a call has streamed its weight through the caches, the
           wrapper's few torch ops ran cold and added 60-100 us (5-9% at 14336x5120);
  * torch: aten._weight_int4pack_mm_for_cpu (int4, after _convert_weight_to_int4pack_for_cpu,
           group scales+zeros in bf16) / aten._weight_int8pack_mm (int8, per-row scales);
  * read:  torch.sum over buffers of the weight's size, interleaved with the two above: the
           rate one call of that size streams at, launch and ramp-up included; and `nread`,
           a numba loop xor-ing the same buffers as uint64 (called like our kernel, through
           numba's dispatcher, not torch's). `%bw` is ours against the faster of the two: the
           same statistic (median) under the same conditions;
  * bw:    torch.sum over a 2 GiB float32 tensor, 3 times before, between and after the
           shapes: median (what `%2G` divides by) and best. On this shared VM the read rate
           drifts by up to 2x within minutes (29-58 GB/s in one hour), so a best-of read
           against a median kernel time compares different minutes;
  * prefill (L=512): our integer path and our tiles-then-GEMM path vs a dense torch matmul
    in bfloat16 (where native) or float32, GOP/s.
Each timed call uses the next of several copies of the weight (>= --pool-mb in all), so the
weight comes from DRAM, not from cache, as in a real decode step. Medians over repeats.
--startup also times the first-run JIT compile (empty numba cache) and the cached start-up of
kernels/cpu.py in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

# torch's OpenMP workers spin after each op and steal the cores from numba's threads: with the
# default policy our int4 decode ran at 11 GB/s, with PASSIVE at 20 GB/s (torch's own kernels
# unchanged). Must be set before torch starts OpenMP; `import pixlocal` does the same, and
# bounds the workers' spinning instead of sleeping at once (pixlocal/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pixlocal.kernels import cpu  # noqa: E402
from pixlocal.qformat import QTensor, QuantSpec  # noqa: E402

SHAPES = [(14336, 5120), (5120, 14336), (4096, 5120), (131072, 5120)]


def read_bandwidth(a: torch.Tensor, repeats: int = 3) -> list[float]:
    """GB/s of torch.sum over `a` (vectorized, on torch's threads, which set_threads made
    equal to the kernels'), `repeats` times. A numba prange sum measured 9.4 GB/s here where
    this measures 48: its float reduction did not vectorize."""
    return [a.numel() * 4 / _timed(a.sum) / 1e9 for _ in range(repeats)]


@numba.njit(parallel=True, cache=True)
def _nread(w, out):  # type: ignore[no-untyped-def]
    """Read every word of w (rows, n) uint64: xor per row into out (vectorizes)."""
    for b in numba.prange(w.shape[0]):
        t = np.uint64(0)
        for i in range(w.shape[1]):
            t ^= w[b, i]
        out[b] = t


def _timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def random_qtensor(M: int, K: int, spec: QuantSpec, g: torch.Generator) -> QTensor:
    """Valid random codes (the kernels' speed does not depend on the values)."""
    N = K // spec.group_size
    if spec.bits == 4:
        return QTensor(torch.randint(0, 256, (M, K // 2), dtype=torch.uint8, generator=g),
                       torch.randint(80, 110, (M, N), dtype=torch.uint8, generator=g),
                       torch.randint(0, 256, (M, N), dtype=torch.uint8, generator=g),
                       (M, K), spec)
    return QTensor(torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g),
                   (torch.rand(M, N, generator=g) * 0.01 + 1e-3).half(), None, (M, K), spec)


def torch_weights(M: int, K: int, spec: QuantSpec, g: torch.Generator):  # type: ignore[no-untyped-def]
    """(callable(x), bytes) for torch's own kernel on an (M, K) weight of the same bits."""
    G = spec.group_size
    if spec.bits == 4:
        codes = torch.randint(0, 16, (M, K), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 8)
        del codes
        sz = (torch.rand(K // G, M, 2, generator=g) * 0.01).bfloat16()
        return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, sz),
                packed.nbytes + sz.nbytes)
    w = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    s = (torch.rand(M, generator=g) * 0.01).bfloat16()
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x, w, s), w.nbytes + s.nbytes)


def bench_decode(M: int, K: int, spec: QuantSpec, repeats: int, pool: int) -> dict:
    g = torch.Generator().manual_seed(M + K + spec.bits)
    first = cpu.prepare(random_qtensor(M, K, spec, g))
    copies = max(1, math.ceil(pool / first.nbytes))
    ours = [first] + [cpu.prepare(random_qtensor(M, K, spec, g)) for _ in range(copies - 1)]
    theirs = [torch_weights(M, K, spec, g) for _ in range(max(1, math.ceil(pool / first.nbytes)))]
    # the same bytes per call read by torch.sum (threaded, one launch), from a pool as large:
    # the streaming rate a call of this size gets, launch and ramp-up included
    reads = [torch.ones(first.nbytes // 4) for _ in range(copies)]
    x = torch.randn(1, K, generator=g).bfloat16()
    xf, out = x.float().numpy(), np.empty((1, first.qweight.shape[0] * cpu.ROWS), np.float32)

    def kernel(w: cpu.CpuQ) -> None:
        cpu._gemv(w.qweight, w.sz, spec.bits == 4, w.bf16, xf, spec.group_size, out)
    kernel(ours[0])  # the same product as the wrapper
    assert torch.equal(cpu.gemv(x, ours[0]), torch.from_numpy(out[:, :M]))
    theirs[0][0](x)
    nw = reads[0].nbytes // 512 * 64  # whole 512-byte rows of 64 words each
    words = [r.numpy().view(np.uint8)[:nw * 8].view(np.uint64).reshape(64, -1) for r in reads]
    xor = np.empty(64, np.uint64)
    _nread(words[0], xor)
    t_ours, t_api, t_torch, t_read, t_nread = [], [], [], [], []
    for r in range(repeats * copies):  # interleaved: ours, api, torch, read, nread, ours, ...
        t_ours.append(_timed(kernel, ours[r % len(ours)]))
        t_api.append(_timed(cpu.gemv, x, ours[(r + 1) % len(ours)]))
        t_torch.append(_timed(theirs[r % len(theirs)][0], x))
        t_read.append(_timed(torch.sum, reads[r % len(reads)]))
        t_nread.append(_timed(_nread, words[(r + 1) % len(words)], xor))
    mo, mt, ma = (statistics.median(t) for t in (t_ours, t_torch, t_api))
    read_gbps = reads[0].nbytes / statistics.median(t_read) / 1e9
    nread_gbps = nw * 8 / statistics.median(t_nread) / 1e9
    return {"shape": [M, K], "scheme": spec.name, "copies": copies,
            "ours_ms": mo * 1e3, "ours_gbps": first.nbytes / mo / 1e9, "ours_bytes": first.nbytes,
            "api_ms": ma * 1e3, "api_gbps": first.nbytes / ma / 1e9,
            "torch_ms": mt * 1e3, "torch_gbps": theirs[0][1] / mt / 1e9,
            "torch_bytes": theirs[0][1], "speedup_vs_torch": mt / mo,
            "same_size_read_gbps": read_gbps, "same_size_nread_gbps": nread_gbps}


def bench_prefill(M: int, K: int, spec: QuantSpec, L: int, repeats: int) -> dict:
    """Both prefill paths (the integer loop, cpu.gemv, and tiles + GEMM, cpu.prefill) against
    a dense matmul in the dtype this CPU multiplies fastest (bfloat16 where native, else
    float32); `ours` is the one cpu.qmatmul picks here."""
    g = torch.Generator().manual_seed(7)
    pq = cpu.prepare(random_qtensor(M, K, spec, g))
    dt = torch.bfloat16 if cpu.BF16_GEMM else torch.float32
    w = torch.randn(M, K, generator=g).to(dt)
    x = torch.randn(L, K, generator=g).bfloat16()
    xd = x.to(dt)
    fns = {"int": lambda: cpu.gemv(x, pq), "tiles": lambda: cpu.prefill(x, pq),
           "dense": lambda: xd @ w.T}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(_timed(f))
    flop = 2 * L * M * K
    med = {k: statistics.median(v) for k, v in times.items()}
    ours = "tiles" if cpu.uses_tiles(L, spec.bits) else "int"
    return {"shape": [M, K], "scheme": spec.name, "L": L, "dense_dtype": str(dt)[6:],
            **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            **{f"{k}_gflops": flop / v / 1e9 for k, v in med.items()},
            "ours": ours, "ratio": med["dense"] / med[ours]}


def crossover(M: int, K: int, spec: QuantSpec, repeats: int) -> list[dict]:
    """gemv (L tokens per weight pass) vs prefill (tiles + GEMM) for small L."""
    g = torch.Generator().manual_seed(9)
    pq = cpu.prepare(random_qtensor(M, K, spec, g))
    rows = []
    for L in (1, 2, 4, 8, 16, 32, 64, 128):
        x = torch.randn(L, K, generator=g).bfloat16()
        cpu.gemv(x, pq)
        cpu.prefill(x, pq)
        tg = statistics.median(_timed(cpu.gemv, x, pq) for _ in range(repeats))
        tp = statistics.median(_timed(cpu.prefill, x, pq) for _ in range(repeats))
        rows.append({"L": L, "gemv_ms": tg * 1e3, "prefill_ms": tp * 1e3})
    return rows


_STARTUP = """
import time; t0 = time.perf_counter()
import torch
from pixlocal.kernels import cpu
from pixlocal.qformat import QTensor, QuantSpec
from pixlocal.quant.quantizer import quantize
t1 = time.perf_counter()
for bits in (4, 8):
    q = quantize(torch.randn(64, 256), QuantSpec(bits, 32))
    cpu.gemv(torch.randn(1, 256), q); cpu.prefill(torch.randn(9, 256), q)
    cpu.prefill(torch.randn(9, 256).bfloat16(), q)
print(time.perf_counter() - t1, t1 - t0)
"""


def startup() -> dict:
    """Seconds to import and run every kernel once: empty numba cache, then warm cache."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, NUMBA_CACHE_DIR=d)
        out = {}
        for key in ("first_run", "cached"):
            res = subprocess.run([sys.executable, "-c", _STARTUP], env=env, check=True,
                                 capture_output=True, text=True).stdout.split()
            out[f"{key}_kernels_s"], out[f"{key}_import_s"] = float(res[0]), float(res[1])
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results as JSON to this file ('-' = stdout)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--pool-mb", type=int, default=512, help="weight copies per shape, in MB")
    ap.add_argument("--schemes", default="int4-g32,int8-g32")
    ap.add_argument("--prefill-L", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="first shape only, no prefill sweep")
    ap.add_argument("--startup", action="store_true", help="also time JIT compile/start-up")
    args = ap.parse_args()
    threads = cpu.set_threads(args.threads)
    specs = [QuantSpec.parse(s) for s in args.schemes.split(",")]
    shapes = SHAPES[:1] if args.quick else SHAPES
    res: dict = {"machine": platform.processor() or platform.machine(), "threads": threads,
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                 "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
                 "simd_bytes": cpu.ROWS * 4, "vnni": cpu.VNNI, "torch": torch.__version__,
                 "numba": numba.__version__, "decode": [], "prefill": []}
    big = torch.ones(2**31 // 4)
    big.sum()
    reads = read_bandwidth(big)
    for spec in specs:
        for M, K in shapes:
            res["decode"].append(bench_decode(M, K, spec, args.repeats, args.pool_mb << 20))
            _row(res["decode"][-1])
            reads += read_bandwidth(big)
    del big
    res["read_bandwidth_gbps"] = statistics.median(reads)
    res["read_bandwidth_best_gbps"] = max(reads)
    for r in res["decode"]:
        r["fraction_of_bandwidth"] = r["ours_gbps"] / max(r["same_size_read_gbps"],
                                                          r["same_size_nread_gbps"])
        r["fraction_of_2gib_read"] = r["ours_gbps"] / res["read_bandwidth_gbps"]
    for spec in specs:
        for M, K in shapes[:3]:
            res["prefill"].append(bench_prefill(M, K, spec, args.prefill_L, 3))
    if not args.quick:
        res["crossover"] = crossover(14336, 5120, specs[0], 5)
    if args.startup:
        res["startup"] = startup()
    _report(res)
    if args.json:
        text = json.dumps(res, indent=1)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")


def _row(r: dict) -> None:
    print(f"  {r['scheme']:9} {r['shape'][0]:>6}x{r['shape'][1]:<6} ours {r['ours_ms']:7.2f} ms "
          f"{r['ours_gbps']:5.1f} GB/s (api {r['api_gbps']:5.1f}) | torch {r['torch_ms']:7.2f} ms "
          f"{r['torch_gbps']:5.1f} GB/s | x{r['speedup_vs_torch']:.2f}", file=sys.stderr,
          flush=True)


def _report(res: dict) -> None:
    bw = res["read_bandwidth_gbps"]
    out = sys.stderr
    print(f"\nthreads {res['threads']}, {res['simd_bytes'] * 8}-bit loops"
          f"{' (VNNI)' if res['vnni'] else ''}, 2 GiB read {bw:.1f} GB/s (median; best "
          f"{res['read_bandwidth_best_gbps']:.1f})", file=out)
    print(f"{'scheme':9} {'M x K':>13} {'ours ms':>8} {'GB/s':>6} {'api':>5} {'torch ms':>9} "
          f"{'GB/s':>6} {'ours/torch':>10} {'read GB/s':>9} {'nread':>5} {'%bw':>4} {'%2G':>4}",
          file=out)
    for r in res["decode"]:
        print(f"{r['scheme']:9} {r['shape'][0]:>6}x{r['shape'][1]:<6} {r['ours_ms']:8.2f} "
              f"{r['ours_gbps']:6.1f} {r['api_gbps']:5.1f} {r['torch_ms']:9.2f} "
              f"{r['torch_gbps']:6.1f} "
              f"{r['speedup_vs_torch']:10.2f} {r['same_size_read_gbps']:9.1f} "
              f"{r['same_size_nread_gbps']:5.1f} "
              f"{100 * r['fraction_of_bandwidth']:4.0f} {100 * r['fraction_of_2gib_read']:4.0f}",
              file=out)
    for r in res["prefill"]:
        print(f"prefill L={r['L']} {r['scheme']} {r['shape'][0]}x{r['shape'][1]}: integer "
              f"{r['int_gflops']:.0f}, tiles {r['tiles_gflops']:.0f}, dense {r['dense_dtype']} "
              f"{r['dense_gflops']:.0f} GOP/s; ours ({r['ours']}) x{r['ratio']:.2f} dense",
              file=out)
    for r in res.get("crossover", []):
        print(f"L={r['L']:3}: gemv {r['gemv_ms']:7.2f} ms, prefill {r['prefill_ms']:7.2f} ms",
              file=out)
    if "startup" in res:
        print(f"startup: {res['startup']}", file=out)


if __name__ == "__main__":
    main()
