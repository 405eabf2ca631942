"""Software prefetch settings of the cpu decode loops, compared in one process (not run by CI).

    python bench/prefetch.py [--scheme int4-g32] [--shape 14336x5120] \\
        [--variants 2048:3:0,6144:2:2048,6144:2:2048:0] [--rounds 12] [--pool-mb 512]

A variant is DIST:LOCALITY:SZ[:MASK]: the weight stream prefetched DIST bytes ahead
(llir.PREFETCH, or PREFETCH8 for int8) with llvm.prefetch locality LOCALITY (3: into L1,
prefetcht0; 2: into L2, prefetcht1), int4's group records SZ bytes ahead (llir.PREFETCH_SZ;
0: off), and llir.HI_MASK (1: int4's high nibbles masked in place, 0: shifted; default 1). Each
variant is a copy of cpu._gemv compiled with its own settings, so all of them run in one
process on the same pages; calls take turns over a pool of weight copies (>= --pool-mb) so
each call streams from DRAM. Prints GB/s (median) per variant and of torch.sum over buffers of
the same size in the same loop, on 1 and on 2 threads. On a shared VM the rate drifts within
minutes: compare variants within a line, and across several runs.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import types

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from numba import njit  # noqa: E402

from pixlocal.kernels import cpu, llir  # noqa: E402
from pixlocal.qformat import QuantSpec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import _timed, random_qtensor  # noqa: E402


def variant(bits: int, dist: int, loc: int, sz: int, mask: int = 1):  # type: ignore[no-untyped-def]
    """A copy of cpu._gemv whose loops are generated with these settings."""
    names = ("PREFETCH" if bits == 4 else "PREFETCH8", "PREFETCH_LOCALITY", "PREFETCH_SZ",
             "HI_MASK")
    saved = {n: getattr(llir, n) for n in names}
    for n, v in zip(names, (dist, loc, sz, bool(mask)), strict=True):
        setattr(llir, n, v)
    try:
        g = dict(cpu.__dict__)
        g["_q4t1"], g["_q8t1"] = cpu._block(4, 1), cpu._block(8, 1)
        g["_q4tn"], g["_q8tn"] = cpu._block(4, cpu.TOKENS), cpu._block(8, cpu.TOKENS)
        fn = njit(parallel=True)(types.FunctionType(cpu._gemv.py_func.__code__, g, "gemv"))
        x = np.ones((1, 64), np.float32)
        q = cpu.prepare(random_qtensor(16, 64, QuantSpec(bits, 32), torch.Generator()))
        fn(q.qweight, q.sz, bits == 4, q.bf16, x, 32, np.empty((1, 16), np.float32))  # compile
    finally:
        for n, v in saved.items():
            setattr(llir, n, v)
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scheme", default="int4-g32")
    ap.add_argument("--shape", default="14336x5120")
    ap.add_argument("--variants", default="2048:3:0,4096:2:0,6144:2:0,6144:2:2048")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--pool-mb", type=int, default=512)
    args = ap.parse_args()
    spec = QuantSpec.parse(args.scheme)
    M, K = (int(v) for v in args.shape.split("x"))
    names = args.variants.split(",")
    fns = {n: variant(spec.bits, *(int(v) for v in n.split(":"))) for n in names}
    g = torch.Generator().manual_seed(0)
    first = cpu.prepare(random_qtensor(M, K, spec, g))
    n = max(2, math.ceil((args.pool_mb << 20) / first.nbytes))
    ws = [first] + [cpu.prepare(random_qtensor(M, K, spec, g)) for _ in range(n - 1)]
    reads = [torch.ones(first.nbytes // 4) for _ in range(n)]
    x = torch.randn(1, K, generator=g).numpy()
    out = np.empty((1, first.qweight.shape[0] * cpu.ROWS), np.float32)
    want = cpu.gemv(torch.from_numpy(x), first)
    for name, fn in fns.items():  # every variant computes the same product
        fn(first.qweight, first.sz, spec.bits == 4, first.bf16, x, spec.group_size, out)
        assert torch.equal(torch.from_numpy(out[:, :M]), want), name
    for threads in (1, 2):
        cpu.set_threads(threads)
        times: dict[str, list[float]] = {k: [] for k in [*fns, "read"]}
        i = 0
        for _ in range(args.rounds * n):
            for name, fn in fns.items():  # each call on the next weight copy: from DRAM
                w = ws[i % n]
                times[name].append(_timed(fn, w.qweight, w.sz, spec.bits == 4, w.bf16, x,
                                          spec.group_size, out))
                i += 1
            times["read"].append(_timed(reads[i % n].sum))
            i += 1
        print(f"{spec.name} {M}x{K} {threads}T  " + "  ".join(
            f"{k} {first.nbytes / statistics.median(v) / 1e9:.1f}" for k, v in times.items()),
            flush=True)


if __name__ == "__main__":
    main()
