"""CPU backend (numba): quantized GEMV for decode, dequantized tiles + torch GEMM for prefill.

Decode streams every weight byte once per token, so it must run at memory bandwidth. Each
token's row is quantized per group to int8 (d = absmax/127, like llama.cpp's q8 activations)
and meets the weight in integer multiply-adds. The weight is read in the file's own layout
(qformat), row by row, front to back; nothing is repacked, so the prepared weight *is* the
memory-mapped tensors (zero-copy). int4's nibble order puts columns j and j + G/2 of a group
in one byte: one vector load, `& 15` and `>> 4` meet the token's `lo`/`hi` halves of each group.
The inner loops are LLVM IR built here (_q4dot, _q8dot): vpmaddubsw (u8 x s8 → i16 pairs) +
vpmaddwd (→ i32) for int4, vpmaddwd on sign-extended bytes for int8 (LLVM 22 does not fuse them
into VNNI vpdpbusd/vpdpwssd here; this loop, not memory, bounds decode on 2 cores: one thread
streams ~25 GB/s and two ~27, where torch.sum reads 42-48); per group the i32 sums become
float32 and meet scale * d in an FMA; one horizontal sum per row. Vectors are 64 bytes
(AVX-512BW) or 32 (AVX2), picked from the host; with neither, the scalar loop for tail groups
does all the work (correct, slow).
Rows are split over threads in blocks (prange); the tokens of one call share each row while it
is in L1, so L tokens cost one pass over the weight.
Prefill (L > PREFILL_MIN[bits]) is compute-bound: tiles of rows are dequantized (IR, exact)
to bfloat16 (for bf16 x) or float32 and multiplied by torch's GEMM, tile after tile.
Every public function has a twin of the same name and signature in ref.py (plain torch).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..qformat import QTensor
from . import llir

# Shapes: L tokens · K in-features · M out-features · G group size · N = K // G · H = G / 2

# More tokens than this (per bit width): tiles + GEMM. bench/kernels.py's crossover, 14336x5120
# g32, bf16 x, 2 threads: int4 gemv 18.1 vs prefill 19.2 ms at L=16; int8 20.8 vs 20.4 at L=8.
PREFILL_MIN = {4: 16, 8: 8}
ROW_BLOCK = 64  # rows per prange task
TILE_BYTES = 8 << 20  # dequantized tile for prefill (~800 rows of K=5120 in bf16: fastest GEMM)
_FEAT = llvm.get_host_cpu_features()
SIMD = 64 if _FEAT.get("avx512bw") else 32 if _FEAT.get("avx2") else 0  # vector bytes


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    try:
        with open("/proc/cpuinfo") as f:
            cores = set(re.findall(r"physical id\s*:\s*(\d+).*?core id\s*:\s*(\d+)", f.read(),
                                   re.S))
    except OSError:
        cores = set()
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    allowed = allowed or os.cpu_count() or 1
    return max(1, min(len(cores) or allowed, allowed))


# numba's "omp" layer: with torch's OpenMP workers passive (OMP_WAIT_POLICY=PASSIVE, set by
# `import pixlocal`) it decodes the 8-layer Nemo int4 model at 13.1-14.7 tok/s against
# 10.7-11.6 with "workqueue", prefill 123 vs 103-118 tok/s (pixlocal bench, 2 threads). With
# torch's workers spinning (the OpenMP default) it ran at a third of that, so workqueue is kept
# then, and wherever omp cannot load. NUMBA_THREADING_LAYER wins.
if "NUMBA_THREADING_LAYER" not in os.environ:
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    numba.config.THREADING_LAYER_PRIORITY = (["omp", "workqueue", "tbb"] if passive else
                                             ["workqueue", "omp", "tbb"])
    numba.config.THREADING_LAYER = "default"


def set_threads(n: int | None = None) -> int:
    """Threads for numba and torch: n, else $PIXLOCAL_THREADS, else physical cores."""
    env = os.environ.get("PIXLOCAL_THREADS", "").strip()
    n = min(n or (int(env) if env.isdigit() and int(env) > 0 else physical_cores()),
            numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    return n


THREADS = set_threads()

# ---- LLVM IR inner loops (llir.py) ---------------------------------------------------------
# numba's cache is keyed on the contents of this file only: bump with every llir.py change.
_LLIR_REVISION = 4

@intrinsic
def _q4dot(typingctx, qw, qoff, lo, hi, f, nchunks, g):
    return types.float32(qw, qoff, lo, hi, f, nchunks, g), llir.q4dot(SIMD)


@intrinsic
def _q8dot(typingctx, qw, qoff, a16, f, ngroups, g):
    return types.float32(qw, qoff, a16, f, ngroups, g), llir.q8dot(SIMD)


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
def _scale4(code):
    """e5m3 code → float32 (qformat.decode_scales)."""
    return _bits2f((np.uint32(code) + np.uint32(808)) << np.uint32(20))


@njit(inline="always")
def _scale8(bits, bf16):
    """int8 scale bits (float16, or bfloat16 if bf16) → float32."""
    return _bits2f(np.uint32(bits) << np.uint32(16)) if bf16 else _half2f(bits)


# ---- numba kernels -------------------------------------------------------------------------

@njit(cache=True)
def _quantize_rows(x, G, a, d, asum):
    """x (L, K) float32 → a (L, K) int8 = round(x / d), d (L, N) = absmax / 127, asum (L, N)."""
    L, K = x.shape
    for t in range(L):
        for g in range(K // G):
            amax = np.float32(0.0)
            for j in range(g * G, g * G + G):
                amax = max(amax, abs(x[t, j]))
            dd = amax / np.float32(127.0)
            d[t, g] = dd
            s = 0
            for j in range(g * G, g * G + G):
                q = np.int8(np.round(x[t, j] / dd)) if dd > 0 else np.int8(0)
                a[t, j] = q
                s += q
            asum[t, g] = s


@njit(parallel=True, cache=True, fastmath=True)
def _gemv4(qw, sc, zc, lo, hi, a, d, asum, out):
    M, K2 = qw.shape
    N = sc.shape[1]
    H = K2 // N
    G = 2 * H
    L = a.shape[0]
    step = max(SIMD, H)
    nch = (K2 // step) * (step // SIMD) if SIMD else 0
    gdone = nch * SIMD // H if SIMD else 0
    for b in prange((M + ROW_BLOCK - 1) // ROW_BLOCK):
        f = np.zeros(N + 16, np.float32)
        for m in range(b * ROW_BLOCK, min(M, (b + 1) * ROW_BLOCK)):
            for t in range(L):
                zt = np.float32(0.0)
                for g in range(N):
                    fg = _scale4(sc[m, g]) * d[t, g]
                    f[g] = fg
                    zt += fg * np.float32(zc[m, g]) * np.float32(asum[t, g])
                acc = _q4dot(qw, m * K2, lo[t], hi[t], f, nch, G)
                for g in range(gdone, N):
                    s = 0
                    for j in range(H):
                        byte = qw[m, g * H + j]
                        s += (byte & 15) * a[t, g * G + j] + (byte >> 4) * a[t, g * G + H + j]
                    acc += f[g] * np.float32(s)
                out[t, m] = acc - zt * np.float32(1.0 / 16.0)


@njit(parallel=True, cache=True, fastmath=True)
def _gemv8(qw, sc, bf16, a16, a, d, out):
    M, K = qw.shape
    N = sc.shape[1]
    G = K // N
    L = a.shape[0]
    ngr = N if SIMD else 0
    for b in prange((M + ROW_BLOCK - 1) // ROW_BLOCK):
        f = np.zeros(N + 16, np.float32)
        for m in range(b * ROW_BLOCK, min(M, (b + 1) * ROW_BLOCK)):
            for t in range(L):
                for g in range(N):
                    f[g] = _scale8(sc[m, g], bf16) * d[t, g]
                acc = _q8dot(qw, m * K, a16[t], f, ngr, G)
                for g in range(ngr, N):
                    s = 0
                    for j in range(g * G, g * G + G):
                        s += qw[m, j] * a[t, j]
                    acc += f[g] * np.float32(s)
                out[t, m] = acc


@njit(parallel=True, cache=True)
def _dequant(qw, sc, zc, int4, bf16, r0, out):
    """Rows r0.. of an int4 (zc: zero codes) or int8 (zc unused) weight → out (R, K)."""
    R, K = out.shape
    N = sc.shape[1]
    for r in prange(R):
        m = r0 + r
        s = np.empty(N, np.float32)
        for g in range(N):
            s[g] = _scale4(sc[m, g]) if int4 else _scale8(sc[m, g], bf16)
        _deqrow(qw, m * qw.shape[1], s, zc[m], N, K // N, out, r * K)


# ---- Python API (twins in ref.py) ----------------------------------------------------------

@dataclass(eq=False)
class CpuQ:
    """A QTensor as the cpu kernels read it: numpy views of the stored tensors (no copy, no
    repack: the file's layout is the fast one), int8 scales as raw 16-bit patterns, and the
    lookup table that turns a scale code/pattern into float32."""

    qweight: np.ndarray  # int4: uint8 (M, K // 2) · int8: int8 (M, K)
    scales: np.ndarray  # int4: uint8 e5m3 codes · int8: uint16 bits of fp16/bf16; (M, N)
    zeros: np.ndarray | None  # int4: uint8 (M, N) · int8: None
    bf16: bool  # int8 scales are bfloat16 (else float16)
    shape: tuple[int, int]
    spec: object  # QuantSpec

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight streams."""
        z = 0 if self.zeros is None else self.zeros.nbytes
        return int(self.qweight.nbytes + self.scales.nbytes + z)


def _np(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"cpu backend got a tensor on {t.device}")
    return t.detach().contiguous().numpy()


def prepare(q: QTensor | CpuQ) -> CpuQ:
    """Wrap a QTensor for the cpu kernels (zero-copy for contiguous CPU tensors)."""
    if isinstance(q, CpuQ):
        return q
    if q.zeros is None:
        sc = _np(q.scales.view(torch.int16)).view(np.uint16)
        return CpuQ(_np(q.qweight), sc, None, q.scales.dtype == torch.bfloat16, q.shape, q.spec)
    return CpuQ(_np(q.qweight), _np(q.scales), _np(q.zeros), False, q.shape, q.spec)


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
    (M, K), G = pq.shape, pq.spec.group_size
    a_t, d_t, s_t = quantize_activation(x, G)
    a, d, asum = a_t.numpy(), d_t.numpy(), s_t.numpy()
    out = np.empty((a.shape[0], M), np.float32)
    if pq.zeros is not None:
        halves = a.reshape(a.shape[0], K // G, 2, G // 2)
        lo = np.ascontiguousarray(halves[:, :, 0]).reshape(-1, K // 2)
        hi = np.ascontiguousarray(halves[:, :, 1]).reshape(-1, K // 2)
        _gemv4(pq.qweight, pq.scales, pq.zeros, lo, hi, a, d, asum, out)
    else:
        _gemv8(pq.qweight, pq.scales, pq.bf16, a.astype(np.int16), a, d, out)
    return torch.from_numpy(out)


def _dequant_into(pq: CpuQ, r0: int, out: np.ndarray) -> None:
    int4 = pq.zeros is not None
    _dequant(pq.qweight, pq.scales, pq.zeros if int4 else pq.scales, int4, pq.bf16, r0, out)


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
    once at the end. bfloat16 x meets bfloat16 tiles and gets a bfloat16 result; any other x
    float32 tiles and result."""
    pq = prepare(q)
    M, K = pq.shape
    bf = x.dtype == torch.bfloat16
    xt = (x if bf else x.float()).T  # (K, L)
    rows = max(16, TILE_BYTES // (K * (2 if bf else 4)))
    buf = np.empty((min(rows, M), K), np.uint16 if bf else np.float32)
    out = torch.empty(M, x.shape[0], dtype=torch.bfloat16 if bf else torch.float32)  # (M, L)
    for r0 in range(0, M, rows):
        n = min(rows, M - r0)
        _dequant_into(pq, r0, buf[:n])
        w = torch.from_numpy(buf[:n])
        torch.mm(w.view(torch.bfloat16) if bf else w, xt, out=out[r0:r0 + n])
    return out.T.contiguous()


def qmatmul(x: torch.Tensor, q: QTensor | CpuQ) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M): gemv (float32) for L <= PREFILL_MIN[bits], else prefill
    (float32, or bfloat16 for bfloat16 x)."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    return gemv(x, q) if x.shape[0] <= PREFILL_MIN[q.spec.bits] else prefill(x, q)
