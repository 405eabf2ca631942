"""CPU backend (numba): integer multiply-adds on repacked weights for decode and, on CPUs
without native bfloat16, for prefill too; dequantized tiles + torch GEMM for prefill elsewhere.

Decode streams every weight byte once per token, so it must run at memory bandwidth. Each
token's row is quantized per group to int8 (d = absmax/127, like llama.cpp's q8 activations)
and meets the weight in integer multiply-adds. `prepare` repacks a weight once, at load
(loader.prepare_quantized frees the file's pages after): blocks of ROWS = 8 rows whose 4-byte
words are interleaved, so one 32-byte load holds 4 bytes of each of 8 rows and one broadcast
dword of activations meets all 8 (llir.block: vpdpbusd with VNNI, else vpmaddubsw +
vpmaddwd); the lane is the row, so a group's scales apply as one vector. Against the row-major
file layout this took int4 decode from 12-13 to 17-18 GB/s on an AVX2 host (bench/README.md).
Without AVX2 the backend refuses (kernels picks "ref"). Rows are split over threads by block
(prange); TOKENS tokens share a pass over a block, so prefill runs in integers too where
bfloat16 is emulated (BF16_GEMM false: AVX2 hosts, 2x the float32 GEMM there). Where it is
native, prefill above PREFILL_MIN[bits] tokens dequantizes tiles of rows (IR, exact) to
bfloat16 or float32 and multiplies them by torch's GEMM. Public functions have twins of the
same name and signature in ref.py (plain torch); decode_attention lives in cpu_attn.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..qformat import QTensor
from . import llir, native_bf16, physical_cores
from .cpu_attn import decode_attention  # noqa: F401  (twin of ref.decode_attention)

# Shapes: L tokens · K in-features · M out-features · G group size · N = K // G · H = G / 2

# Where bfloat16 is native (BF16_GEMM), more tokens than this (per bit width) take tiles +
# GEMM (bench/kernels.py's crossover, AVX-512 BF16 host, 14336x5120 g32, 2 threads).
PREFILL_MIN = {4: 16, 8: 8}
TILE_BYTES = 8 << 20  # dequantized tile for prefill (~800 rows of K=5120 in bf16: fastest GEMM)
_FEAT = llvm.get_host_cpu_features()
SIMD = 32 if _FEAT.get("avx2") else 0  # vector bytes of the decode loops (AVX2; 0: none)
VNNI = bool(SIMD and (_FEAT.get("avx512vnni") and _FEAT.get("avx512vl") or _FEAT.get("avxvnni")))
ROWS = llir.ROWS  # rows per interleaved block
BF16_GEMM = native_bf16()  # else prefill multiplies float32 tiles


# numba's "omp" layer with OpenMP workers passive (OMP_WAIT_POLICY=PASSIVE, set by `import
# pixlocal`): 13.1-14.7 tok/s decode against 10.7-11.6 with "workqueue" (8-layer Nemo int4, 2
# threads); spinning workers (OMP default, or GOMP_SPINCOUNT) ran slower still, so workqueue
# is kept then. NUMBA_THREADING_LAYER wins.
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
_LLIR_REVISION = 11  # numba caches by this file's contents: bump with every llir.py change


def _block(bits: int, T: int, vnni: bool = VNNI):  # noqa: ANN202
    @intrinsic
    def blk(typingctx, qw, qoff, sz, soff, a, aoff, astr, d, e, doff, dstr, n, g, bf, out,
            ooff, ostr):  # noqa: ANN001
        sig = types.void(qw, qoff, sz, soff, a, aoff, astr, d, e, doff, dstr, n, g, bf, out,
                         ooff, ostr)
        return sig, llir.block(bits, T, vnni)
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


@njit(parallel=True, cache=True)
def _gemv(qw, sz, int4, bf16, x, G, out):
    """out (L, Mp) = x (L, K) float32, quantized per group to int8, times the int4 or int8
    weight (TOKENS tokens per pass over a block of rows, then one at a time)."""
    L, K = x.shape
    N, BB, SZ, Mp = K // G, qw.shape[1], sz.shape[1], out.shape[1]
    a, d = np.empty((L, K), np.int8), np.empty((L, N), np.float32)
    asum = np.empty((L, N), np.int32)
    _quantize_rows(x, G, a, d, asum)
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
def _interleave(w, out):
    """w (M, D) uint32 rows → out (Mb, D, ROWS): dword i of the block's rows side by side;
    rows past M are zero."""
    M, D = w.shape
    for b in prange(out.shape[0]):
        for r in range(ROWS):
            m = b * ROWS + r
            if m < M:
                for i in range(D):
                    out[b, i, r] = w[m, i]
            else:
                for i in range(D):
                    out[b, i, r] = 0


@njit(parallel=True, cache=True)
def _dequant(qw, sz, int4, bf16, G, r0, out):
    """Rows r0.. of an interleaved int4 or int8 weight → out (R, K) float32 or bf16 bits."""
    R, K = out.shape
    N = K // G
    D = qw.shape[1] // (4 * ROWS)
    b0, b1 = r0 // ROWS, (r0 + R + ROWS - 1) // ROWS
    for b in prange(b0, b1):
        w32 = qw[b].view(np.uint32)
        row = np.empty(D, np.uint32)
        s, z = np.empty(N, np.float32), np.empty(N, np.uint8)
        for i in range(ROWS):
            m = b * ROWS + i
            if m < r0 or m >= r0 + R:
                continue
            for j in range(D):
                row[j] = w32[j * ROWS + i]
            for g in range(N):
                if int4:
                    s[g] = _scale(sz[b, g * 16 + i], True, False)
                    z[g] = sz[b, g * 16 + ROWS + i]
                else:
                    s[g] = _scale(sz[b, g * ROWS + i], False, bf16)
            if int4:
                _deqrow(row.view(np.uint8), 0, s, z, N, G, out, (m - r0) * K)
            else:
                _deqrow(row.view(np.int8), 0, s, z, N, G, out, (m - r0) * K)


# ---- Python API (twins in ref.py) ----------------------------------------------------------

@dataclass(eq=False)
class CpuQ:
    """A QTensor as the cpu kernels read it, repacked once (`prepare`): blocks of ROWS rows
    whose dwords are interleaved (qweight (Mb, ROWS * row bytes) uint8: dword i of rows
    0..ROWS-1 of the block, then dword i+1, ...) and the block's per-group scales side by
    side (sz: int4 (Mb, N*16) uint8, 8 e5m3 scale codes then 8 zero codes per group; int8
    (Mb, N*ROWS) uint16 float16/bfloat16 bits). Mb = ceil(M / ROWS); padding rows are zero."""

    qweight: np.ndarray
    sz: np.ndarray
    bf16: bool  # int8 scales are bfloat16 (else float16)
    shape: tuple[int, int]
    spec: object  # QuantSpec

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight streams."""
        return int(self.qweight.nbytes + self.sz.nbytes)


def _np(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"cpu backend got a tensor on {t.device}")
    return t.detach().contiguous().numpy()


def _side_by_side(a: np.ndarray, Mb: int) -> np.ndarray:
    """(M, N) per-row values → (Mb, N, ROWS): row r of block b at [b, :, r]; zero padded."""
    M, N = a.shape
    p = np.zeros((Mb * ROWS, N), a.dtype)
    p[:M] = a
    return p.reshape(Mb, ROWS, N).transpose(0, 2, 1)


def prepare(q: QTensor | CpuQ) -> CpuQ:
    """Repack a QTensor for the cpu kernels (a copy of the same size as the stored weight; the
    loader then drops the file's mapped pages, see loader.pack_for_backends)."""
    if isinstance(q, CpuQ):
        return q
    if not SIMD:
        raise RuntimeError("the cpu backend needs AVX2; use PIXLOCAL_BACKEND=ref")
    M, _ = q.shape
    Mb = -(-M // ROWS)
    w = _np(q.qweight)
    w32 = w.view(np.uint32) if w.shape[1] % 4 == 0 and w.ctypes.data % 4 == 0 else \
        np.ascontiguousarray(w).copy().view(np.uint32)
    qw = np.empty((Mb, w32.shape[1], ROWS), np.uint32)
    _interleave(w32, qw)
    if q.zeros is None:
        bf = q.scales.dtype == torch.bfloat16
        sc = _np(q.scales.view(torch.int16)).view(np.uint16)
        sz = _side_by_side(sc, Mb)
    else:
        bf = False
        sz = np.concatenate([_side_by_side(_np(q.scales), Mb),
                             _side_by_side(_np(q.zeros), Mb)], axis=2)
    return CpuQ(qw.reshape(Mb, -1).view(np.uint8), np.ascontiguousarray(sz).reshape(Mb, -1),
                bf, q.shape, q.spec)


def fuse(pqs: list[CpuQ]) -> tuple[CpuQ, list[CpuQ]] | None:
    """Weights of one layout (bits, G, K, scale dtype), whole row blocks, stacked into one
    CpuQ (a copy; views into it replace the inputs): wq/wk/wv or w1/w3 in one call, one
    thread launch (50-100 us on a 2-core VM) instead of three or two. None if they differ."""
    p0 = pqs[0]
    if any(p.spec != p0.spec or p.bf16 != p0.bf16 or p.shape[1] != p0.shape[1]
           or p.shape[0] % ROWS for p in pqs):
        return None
    qw, sz = np.concatenate([p.qweight for p in pqs]), np.concatenate([p.sz for p in pqs])
    views, b0 = [], 0
    for p in pqs:
        b1 = b0 + p.qweight.shape[0]
        views.append(CpuQ(qw[b0:b1], sz[b0:b1], p.bf16, p.shape, p.spec))
        b0 = b1
    return CpuQ(qw, sz, p0.bf16, (sum(p.shape[0] for p in pqs), p0.shape[1]), p0.spec), views


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
    M, G = pq.shape[0], pq.spec.group_size
    xf = _np(x.float())
    out = np.empty((xf.shape[0], pq.qweight.shape[0] * ROWS), np.float32)
    _gemv(pq.qweight, pq.sz, pq.spec.bits == 4, pq.bf16, xf, G, out)
    y = torch.from_numpy(out)
    return y if out.shape[1] == M else y[:, :M]


def _dequant_into(pq: CpuQ, r0: int, out: np.ndarray) -> None:
    _dequant(pq.qweight, pq.sz, pq.spec.bits == 4, pq.bf16, pq.spec.group_size, r0, out)


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
    """x (L, K) @ W.T → (L, M): prefill (float32, or bfloat16 for bfloat16 x) for L >
    PREFILL_MIN[bits] where bfloat16 is native, else gemv (float32)."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    if BF16_GEMM and x.shape[0] > PREFILL_MIN[q.spec.bits]:
        return prefill(x, q)
    return gemv(x, q)
