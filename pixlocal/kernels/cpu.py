"""CPU backend (numba): integer multiply-adds on repacked weights for decode and, on CPUs
without native bfloat16, for prefill too; dequantized tiles + torch GEMM for prefill elsewhere.

Decode streams every weight byte once per token, so it must run at memory bandwidth. Each
token's row is quantized per group to int8 (d = absmax/127, like llama.cpp's q8 activations)
and meets the weight in integer multiply-adds. cpu_layout.prepare repacks a weight once, at
load (loader.prepare_quantized frees the file's pages after): blocks of ROWS rows (16 where
AVX-512 has VNNI, else 8) whose 4-byte words are interleaved, so one vector load holds 4 bytes
of every row of the block and one broadcast dword of activations meets them all (llir.block:
vpdpbusd with VNNI, else vpmaddubsw + vpmaddwd); the lane is the row, so a group's scales
apply as one vector. Against the row-major file layout this took int4 decode from 12-13 to
17-18 GB/s on an AVX2 host (bench/README.md). Without AVX2 the backend refuses (kernels picks
"ref"). Rows are split over threads by block (prange); TOKENS tokens share a pass over a
block, so prefill runs in integers too: 2x the float32 GEMM on AVX2 hosts (bfloat16
emulated), 1.2-1.5x the bfloat16 GEMM with 512-bit VNNI loops. Elsewhere (TILES: AMX, or
native bfloat16 with 256-bit loops) prefill above PREFILL_MIN[bits] tokens dequantizes tiles
of rows (IR, exact) to bfloat16 or float32 and multiplies them by torch's GEMM. Public
functions have twins of the same name and signature in ref.py (plain torch);
decode_attention lives in cpu_attn.py, prepare and fuse in cpu_layout.py.
"""

from __future__ import annotations

import os

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..qformat import QTensor
from ..host import requested_threads, usable_cores
from . import llir, native_bf16
from .cpu_attn import decode_attention  # noqa: F401  (twin of ref.decode_attention)
from .cpu_layout import ROWS, SIMD, VNNI, CpuQ, _np, fuse, prepare  # noqa: F401

# Shapes: L tokens · K in-features · M out-features · G group size · N = K // G · H = G / 2

# Where TILES, more tokens than this (per bit width) take tiles + GEMM (bench/kernels.py's
# crossover, AVX-512 BF16 host with the 8-row loops, 14336x5120 g32, 2 threads).
PREFILL_MIN = {4: 16, 8: 8}
TILE_BYTES = 8 << 20  # dequantized tile for prefill (~800 rows of K=5120 in bf16: fastest GEMM)
BF16_GEMM = native_bf16()  # else prefill multiplies float32 tiles
# Tiles + GEMM only where they beat the integer loops: 512-bit VNNI loops ran L=512 prefill
# at 500-630 GOP/s, tiles 310-365, a dense bfloat16 matmul 400-436 (Zen 4, 2 threads). AMX
# (not measured here) or native bfloat16 with 256-bit loops keep the tiles.
TILES = bool(torch.cpu._is_amx_tile_supported() or (BF16_GEMM and ROWS == 8))


def uses_tiles(L: int, bits: int) -> bool:
    """Whether qmatmul takes prefill (tiles + GEMM) for L tokens, else gemv."""
    return TILES and L > PREFILL_MIN[bits]


# numba's "omp" layer shares torch's OpenMP pool; with its workers passive but spinning a
# bounded while (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT, set by `import pixlocal`) it ran
# decode at 13.1-14.7 tok/s against 10.7-11.6 with "workqueue" (8-layer Nemo int4, 2
# threads, before the spin count); with unbounded spinning workqueue is kept.
# NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    numba.config.THREADING_LAYER_PRIORITY = (["omp", "workqueue", "tbb"] if passive else
                                             ["workqueue", "omp", "tbb"])
    numba.config.THREADING_LAYER = "default"


def set_threads(n: int | None = None) -> int:
    """Fix numba's and torch's thread counts: n, else $PIXLOCAL_THREADS, else the usable
    cores (host.usable_cores). For benchmarks and tests; `pixlocal.load` gives its runner a
    threads.ThreadPolicy, which sets them per decode step."""
    from .threads import apply_threads
    return apply_threads(requested_threads(n) or usable_cores())

# ---- LLVM IR inner loops (llir.py) ---------------------------------------------------------
# The kernels embed llir.py's loops: jit.py keys numba's cache on every kernel source.


def _block(bits: int, T: int, vnni: bool = VNNI, rows: int = ROWS):  # noqa: ANN202
    @intrinsic
    def blk(typingctx, qw, qoff, sz, soff, a, aoff, astr, d, e, doff, dstr, n, g, bf, out,
            ooff, ostr):  # noqa: ANN001
        sig = types.void(qw, qoff, sz, soff, a, aoff, astr, d, e, doff, dstr, n, g, bf, out,
                         ooff, ostr)
        return sig, llir.block(bits, T, vnni, rows)
    return blk


TOKENS = 4  # tokens per pass over a block when L >= TOKENS (prefill)
# T tokens x one block of ROWS rows (llir.block), per bit width
_q4t1, _q4tn, _q8t1, _q8tn = _block(4, 1), _block(4, TOKENS), _block(8, 1), _block(8, TOKENS)


@intrinsic
def _deqrow(typingctx, qw, qoff, s, z, ngroups, g, out, ooff):
    codegen = llir.deqrow(qw.dtype == types.uint8, out.dtype == types.uint16)
    return types.void(qw, qoff, s, z, ngroups, g, out, ooff), codegen


@intrinsic
def _bits2f(typingctx, v):
    """A uint32 bit pattern as float32 (vectorizes, unlike a table lookup)."""
    return types.float32(types.uint32), lambda c, b, s, a: b.bitcast(a[0], ir.FloatType())


@intrinsic
def _half2f(typingctx, v):
    """A uint16 float16 bit pattern as float32 (vcvtph2ps when vectorized)."""
    return types.float32(types.uint16), lambda c, b, s, a: b.fpext(
        b.bitcast(a[0], ir.HalfType()), ir.FloatType())


@njit(inline="always")
def _scale(v, int4, bf16):
    """A stored scale → float32: int4's e5m3 code (qformat.decode_scales), else int8's
    float16 or (bf16) bfloat16 bits."""
    if int4:
        return _bits2f((np.uint32(v) + np.uint32(808)) << np.uint32(20))
    return _bits2f(np.uint32(v) << np.uint32(16)) if bf16 else _half2f(v)


# ---- numba kernels -------------------------------------------------------------------------

_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 half to even


@njit(inline="always")
def _quantize_row(x, t, G, a, d, asum):
    """Row t of x (L, K) float32 → a[t] int8 = round(x / d) half to even, d[t] = absmax /
    127 per group (0 for an all-zero group), asum[t]. Branch-free inner loops and the magic
    constant instead of np.round's call: 2x faster, the same bits."""
    for g in range(x.shape[1] // G):
        xs, aa = x[t, g * G:g * G + G], a[t, g * G:g * G + G]
        amax = np.float32(0.0)
        for j in range(G):
            amax = max(amax, abs(xs[j]))
        dd = amax / np.float32(127.0)
        d[t, g] = dd
        div = dd if dd > 0 else np.float32(1.0)
        s = 0
        for j in range(G):
            q = np.int32((xs[j] / div + _MAGIC) - _MAGIC)
            aa[j] = q
            s += q
        asum[t, g] = s


@njit(cache=True)
def _quantize_rows(x, G, a, d, asum):
    for t in range(x.shape[0]):
        _quantize_row(x, t, G, a, d, asum)


@njit(parallel=True, cache=True)
def _gemv(qw, sz, int4, bf16, x, G, out):
    """out (L, Mp) = x (L, K) float32, quantized per group to int8, times the int4 or int8
    weight (TOKENS tokens per pass over a block of rows, then one at a time)."""
    L, K = x.shape
    N, BB, SZ, Mp = K // G, qw.shape[1], sz.shape[1], out.shape[1]
    a, d = np.empty((L, K), np.int8), np.empty((L, N), np.float32)
    asum = np.empty((L, N), np.int32)
    if L >= TOKENS:  # prefill: tokens on threads (one launch more than decode can afford)
        for t in prange(L):
            _quantize_row(x, t, G, a, d, asum)
    else:
        for t in range(L):
            _quantize_row(x, t, G, a, d, asum)
    e = d * asum.astype(np.float32) * np.float32(1.0 / 16.0)
    Ln = L - L % TOKENS
    for b in prange(qw.shape[0]):
        qo, so, oo = b * BB, b * SZ, b * ROWS
        for t in range(0, Ln, TOKENS):
            if int4:
                _q4tn(qw, qo, sz, so, a, t * K, K, d, e, t * N, N, N, G, 0, out, t * Mp + oo, Mp)
            else:
                _q8tn(qw, qo, sz, so, a, t * K, K, d, e, t * N, N, N, G, bf16, out, t * Mp + oo,
                      Mp)
        for t in range(Ln, L):
            if int4:
                _q4t1(qw, qo, sz, so, a, t * K, K, d, e, t * N, N, N, G, 0, out, t * Mp + oo, Mp)
            else:
                _q8t1(qw, qo, sz, so, a, t * K, K, d, e, t * N, N, N, G, bf16, out, t * Mp + oo,
                      Mp)


@njit(parallel=True, cache=True)
def _dequant(qw, sz, int4, bf16, G, r0, out, rows):
    """Rows r0.. of an int4 or int8 weight interleaved in blocks of `rows` → out (R, K)
    float32 or bf16 bits."""
    R, K = out.shape
    N = K // G
    D = qw.shape[1] // (4 * rows)
    b0, b1 = r0 // rows, (r0 + R + rows - 1) // rows
    for b in prange(b0, b1):
        w32 = qw[b].view(np.uint32)
        row = np.empty(D, np.uint32)
        s, z = np.empty(N, np.float32), np.empty(N, np.uint8)
        for i in range(rows):
            m = b * rows + i
            if m < r0 or m >= r0 + R:
                continue
            for j in range(D):
                row[j] = w32[j * rows + i]
            for g in range(N):
                if int4:
                    s[g] = _scale(sz[b, g * 2 * rows + i], True, False)
                    z[g] = sz[b, g * 2 * rows + rows + i]
                else:
                    s[g] = _scale(sz[b, g * rows + i], False, bf16)
            if int4:
                _deqrow(row.view(np.uint8), 0, s, z, N, G, out, (m - r0) * K)
            else:
                _deqrow(row.view(np.int8), 0, s, z, N, G, out, (m - r0) * K)


# ---- Python API (twins in ref.py) ----------------------------------------------------------

def quantize_activation(x: torch.Tensor, group_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (L, K) → a (L, K) int8, d (L, N) float32, asum (L, N) int32 with x ≈ a * d per group
    (d = absmax / 127, a = round(x / d), half to even; d = 0 for an all-zero group)."""
    xf = _np(x.float())
    L, K = xf.shape
    a = np.empty((L, K), np.int8)
    d = np.empty((L, K // group_size), np.float32)
    asum = np.empty((L, K // group_size), np.int32)
    _quantize_rows(xf, group_size, a, d, asum)
    return torch.from_numpy(a), torch.from_numpy(d), torch.from_numpy(asum)


def gemv(x: torch.Tensor, q: QTensor | CpuQ) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M) float32 with x quantized per group to int8 first (decode)."""
    pq = prepare(q)
    if pq.rows != ROWS:
        raise ValueError(f"weight packed in blocks of {pq.rows} rows; this host's loops take "
                         f"{ROWS}")
    M, G = pq.shape[0], pq.spec.group_size
    xf = _np(x.float())
    out = np.empty((xf.shape[0], pq.qweight.shape[0] * ROWS), np.float32)
    _gemv(pq.qweight, pq.sz, pq.spec.bits == 4, pq.bf16, xf, G, out)
    y = torch.from_numpy(out)
    return y if out.shape[1] == M else y[:, :M]


def _dequant_into(pq: CpuQ, r0: int, out: np.ndarray) -> None:
    _dequant(pq.qweight, pq.sz, pq.spec.bits == 4, pq.bf16, pq.spec.group_size, r0, out,
             pq.rows)


def dequantize_rows(q: QTensor | CpuQ, r0: int, r1: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows r0..r1-1 of the weight, dequantized to float32 or bfloat16 (R, K)."""
    pq = prepare(q)
    bf = dtype == torch.bfloat16
    out = np.empty((r1 - r0, pq.shape[1]), np.uint16 if bf else np.float32)
    _dequant_into(pq, r0, out)
    t = torch.from_numpy(out)
    return t.view(torch.bfloat16) if bf else t.to(dtype)


def prefill(x: torch.Tensor, q: QTensor | CpuQ) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M) by tiles of rows: dequantize, then torch GEMM into the rows of a
    (M, L) result (contiguous writes: 25% faster than into (L, M) column slices), transposed
    once at the end. bfloat16 x gets a bfloat16 result, any other x float32. The tiles are
    bfloat16 for bfloat16 x where the CPU multiplies bfloat16 natively (BF16_GEMM), float32
    otherwise: on an AVX2-only host torch's bfloat16 GEMM ran at 15-20 GFLOP/s, float32 at
    100-110 (512 x 5120 x 4096, 2 threads)."""
    pq = prepare(q)
    M, K = pq.shape
    want_bf = x.dtype == torch.bfloat16
    bf = want_bf and BF16_GEMM
    xt = (x if bf else x.float()).T  # (K, L)
    rows = max(16, TILE_BYTES // (K * (2 if bf else 4)))
    buf = np.empty((min(rows, M), K), np.uint16 if bf else np.float32)
    out = torch.empty(M, x.shape[0], dtype=torch.bfloat16 if bf else torch.float32)  # (M, L)
    for r0 in range(0, M, rows):
        n = min(rows, M - r0)
        _dequant_into(pq, r0, buf[:n])
        w = torch.from_numpy(buf[:n])
        torch.mm(w.view(torch.bfloat16) if bf else w, xt, out=out[r0:r0 + n])
    y = out.T
    return y.to(torch.bfloat16) if want_bf and not bf else y.contiguous()


def qmatmul(x: torch.Tensor, q: QTensor | CpuQ) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M): prefill (float32, or bfloat16 for bfloat16 x) where
    uses_tiles, else gemv (float32)."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    if uses_tiles(x.shape[0], q.spec.bits):
        return prefill(x, q)
    return gemv(x, q)
