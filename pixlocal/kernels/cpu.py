"""CPU backend (numba): quantized GEMV for decode, dequantize-a-tile + torch GEMM for prefill.

Decode (few tokens) streams every weight byte once, so it must run at memory bandwidth:
  * each token's activation row is quantized per group to int8 (d = absmax / 127, a = round(x/d),
    like llama.cpp's q8 activations; `quantize_activation`);
  * the weight stays in the file's layout (qformat), read row by row, front to back: int4's
    nibble order already puts columns j and j + G/2 of a group in one byte, so one vector load,
    `& 0x0F` and `>> 4` give two runs of weights that meet two runs of activations (stored
    split into `lo`/`hi` halves per group once per token). No repack: the prepared weight
    is the (memory-mapped) stored tensors themselves, zero-copy;
  * the inner loop is LLVM IR written here (`_q4dot`, `_q8dot`) with x86 integer
    multiply-add: vpmaddubsw (u8 x s8 -> i16 pairs) + vpmaddwd (-> i32), or vpmaddwd on
    sign-extended int8 (int8 weights); per group the i32 dots become float32 and meet
    scale * d in an FMA, one horizontal sum per row. AVX-512BW (64-byte vectors) or AVX2
    (32-byte) is picked from the host; without either the scalar loop that handles tail
    groups does all the work (slow, correct).
  * rows are split over threads in blocks (prange); all tokens of a call reuse a row's bytes
    while they are in L1, so L tokens cost one pass over the weight.
Prefill (L > PREFILL_MIN tokens) is compute-bound: tiles of rows are dequantized (numba,
parallel) to bfloat16 (x bf16) or float32 and multiplied by torch's GEMM, tile by tile.

Every public function has a twin of the same name and signature in ref.py (plain torch).
"""

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

# Shapes: L tokens · K in-features · M out-features · G group size · N = K // G groups · H = G/2

PREFILL_MIN = 8  # more tokens than this: dequantize tiles + GEMM (bench/kernels.py measures it)
ROW_BLOCK = 64  # rows per prange task
TILE_BYTES = 4 << 20  # dequantized tile size for prefill

_FEATURES = llvm.get_host_cpu_features()
SIMD = 64 if _FEATURES.get("avx512bw") else 32 if _FEATURES.get("avx2") else 0  # vector bytes


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthreads not counted)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = set()
    try:
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = val.strip()
                elif key == "core id":
                    core = val.strip()
                    cores.add((phys, core))
    except OSError:
        pass
    n = len(cores) or os.cpu_count() or 1
    return max(1, min(n, allowed or n))


def set_threads(n: int | None = None) -> int:
    """Threads for numba and torch: n, else $PIXLOCAL_THREADS, else physical cores."""
    env = os.environ.get("PIXLOCAL_THREADS", "").strip()
    n = n or (int(env) if env.isdigit() and int(env) > 0 else physical_cores())
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    torch.set_num_threads(n)
    return n


THREADS = set_threads()


# ---- LLVM IR inner loops -------------------------------------------------------------------

def _vt(n: int, t: ir.Type) -> ir.VectorType:
    return ir.VectorType(t, n)


_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
_FC = ("contract",)  # let LLVM fuse multiply and add into an FMA
_MADDUBS = {64: "llvm.x86.avx512.pmaddubs.w.512", 32: "llvm.x86.avx2.pmadd.ub.sw"}
_MADDWD = {64: "llvm.x86.avx512.pmaddw.d.512", 32: "llvm.x86.avx2.pmadd.wd"}


def _fn(builder: ir.IRBuilder, name: str, ret: ir.Type, *args: ir.Type) -> ir.Function:
    mod = builder.module
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)


def _vptr(context, builder, aryty, ary, offset, vty):
    """Pointer to a vector at element `offset` of a C-contiguous array."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [offset]), vty.as_pointer())


def _hsum(builder: ir.IRBuilder, acc: ir.Value, n: int) -> ir.Value:
    red = _fn(builder, f"llvm.vector.reduce.fadd.v{n}f32", _F32, _F32, _vt(n, _F32))
    return builder.call(red, [ir.Constant(_F32, 0.0), acc])


def _loop(builder: ir.IRBuilder, count: ir.Value, body) -> None:
    from numba.core import cgutils
    with cgutils.for_range(builder, count) as loop:
        body(loop.index)


@intrinsic
def _q4dot(typingctx, qw, qoff, lo, hi, f, nchunks, g):
    """sum over chunks c < nchunks of SIMD bytes of the int4 row at qw[qoff:]:
    f[group] * (i32 dot of the nibbles with lo/hi), float32. g: the group size (lanes map
    to groups by 8 * lane // g)."""
    sig = types.float32(qw, qoff, lo, hi, f, nchunks, g)

    def codegen(context, builder, signature, args):
        W = SIMD
        if W == 0:
            return ir.Constant(_F32, 0.0)
        qw_, qoff_, lo_, hi_, f_, n_, g_ = args
        nl = W // 4  # i32 lanes
        acc = builder.alloca(_vt(nl, _F32))
        builder.store(ir.Constant(_vt(nl, _F32), None), acc)
        mub = _fn(builder, _MADDUBS[W], _vt(W // 2, _I16), _vt(W, _I8), _vt(W, _I8))
        mwd = _fn(builder, _MADDWD[W], _vt(nl, _I32), _vt(W // 2, _I16), _vt(W // 2, _I16))
        ones = ir.Constant(_vt(W // 2, _I16), [1] * (W // 2))
        m15 = ir.Constant(_vt(W, _I8), [15] * W)
        four = ir.Constant(_vt(W, _I8), [4] * W)
        t = signature.args

        def body(c):
            off = builder.mul(c, ir.Constant(c.type, W))
            v = builder.load(_vptr(context, builder, t[0], qw_, builder.add(qoff_, off),
                                   _vt(W, _I8)), align=1)
            a0 = builder.load(_vptr(context, builder, t[2], lo_, off, _vt(W, _I8)), align=1)
            a1 = builder.load(_vptr(context, builder, t[3], hi_, off, _vt(W, _I8)), align=1)
            p = builder.add(builder.call(mub, [builder.and_(v, m15), a0]),
                            builder.call(mub, [builder.lshr(v, four), a1]))
            dots = builder.sitofp(builder.call(mwd, [p, ones]), _vt(nl, _F32))
            gb = builder.sdiv(builder.mul(c, ir.Constant(c.type, 2 * W)), g_)
            fv = builder.load(_vptr(context, builder, t[4], f_, gb, _vt(nl, _F32)), align=4)
            # lane l holds weights 8l..8l+7 of the chunk (lo and hi) → group gb + 8l // g
            lanes = [[8 * lane // gs for lane in range(nl)] for gs in (32, 64, 128)]
            s32, s64, s128 = (builder.shuffle_vector(fv, fv, ir.Constant(_vt(nl, _I32), m))
                              for m in lanes)
            is32 = builder.icmp_signed("==", g_, ir.Constant(g_.type, 32))
            is64 = builder.icmp_signed("==", g_, ir.Constant(g_.type, 64))
            sv = builder.select(is32, s32, builder.select(is64, s64, s128))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(dots, sv, flags=_FC),
                                      flags=_FC), acc)

        _loop(builder, n_, body)
        return _hsum(builder, builder.load(acc), nl)

    return sig, codegen


@intrinsic
def _q8dot(typingctx, qw, qoff, a16, f, ngroups, g):
    """sum over groups j < ngroups of f[j] * (i32 dot of int8 row qw[qoff:] with int16 a16)."""
    sig = types.float32(qw, qoff, a16, f, ngroups, g)

    def codegen(context, builder, signature, args):
        W = SIMD
        if W == 0:
            return ir.Constant(_F32, 0.0)
        qw_, qoff_, a_, f_, n_, g_ = args
        nl, nw = W // 4, W // 2  # i32 lanes, i16 lanes = weights per multiply-add
        acc = builder.alloca(_vt(nl, _F32))
        builder.store(ir.Constant(_vt(nl, _F32), None), acc)
        isum = builder.alloca(_vt(nl, _I32))
        mwd = _fn(builder, _MADDWD[W], _vt(nl, _I32), _vt(nw, _I16), _vt(nw, _I16))
        t = signature.args

        def group(j):
            builder.store(ir.Constant(_vt(nl, _I32), None), isum)
            base = builder.mul(j, g_)

            def chunk(c):
                off = builder.add(base, builder.mul(c, ir.Constant(c.type, nw)))
                w = builder.load(_vptr(context, builder, t[0], qw_, builder.add(qoff_, off),
                                       _vt(nw, _I8)), align=1)
                a = builder.load(_vptr(context, builder, t[2], a_, off, _vt(nw, _I16)), align=2)
                d = builder.call(mwd, [builder.sext(w, _vt(nw, _I16)), a])
                builder.store(builder.add(builder.load(isum), d), isum)

            _loop(builder, builder.sdiv(g_, ir.Constant(g_.type, nw)), chunk)
            fj = builder.load(builder.gep(context.make_array(t[3])(context, builder, f_).data,
                                          [j]))
            fv = builder.insert_element(ir.Constant(_vt(nl, _F32), None), fj,
                                        ir.Constant(_I32, 0))
            fv = builder.shuffle_vector(fv, fv, ir.Constant(_vt(nl, _I32), [0] * nl))
            prod = builder.fmul(builder.sitofp(builder.load(isum), _vt(nl, _F32)), fv, flags=_FC)
            builder.store(builder.fadd(builder.load(acc), prod, flags=_FC), acc)

        _loop(builder, n_, group)
        return _hsum(builder, builder.load(acc), nl)

    return sig, codegen


@intrinsic
def _bits2f(typingctx, v):
    """A uint32 bit pattern as float32 (vectorizes, unlike a table lookup)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _F32)
    return types.float32(types.uint32), codegen


@intrinsic
def _half2f(typingctx, v):
    """A uint16 float16 bit pattern as float32 (vcvtph2ps when vectorized)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
    return types.float32(types.uint16), codegen


@njit(inline="always")
def _scale4(code):
    """e5m3 code → float32 (qformat.decode_scales)."""
    return _bits2f((np.uint32(code) + np.uint32(808)) << np.uint32(20))


@njit(inline="always")
def _scale8(bits, bf16):
    """int8 scale bits (float16, or bfloat16 if bf16) → float32."""
    return _bits2f(np.uint32(bits) << np.uint32(16)) if bf16 else _half2f(bits)


@intrinsic
def _deqrow(typingctx, qw, qoff, s, z, ngroups, g, out, ooff):
    """Dequantize one row: groups j < ngroups of qw from element qoff (int4 bytes or int8),
    with float32 scales s[j] and (int4) zero codes z[j], into out from ooff, 16 weights per
    vector; out float32, or uint16 holding bfloat16 (round to nearest even)."""
    sig = types.void(qw, qoff, s, z, ngroups, g, out, ooff)
    int4, bf = qw.dtype == types.uint8, out.dtype == types.uint16

    def codegen(context, builder, signature, args):
        qw_, qoff_, s_, z_, n_, g_, out_, ooff_ = args
        t = signature.args
        v16, f16 = _vt(16, _I8), _vt(16, _F32)
        per = builder.sdiv(g_, ir.Constant(g_.type, 32 if int4 else 16))  # vectors per group

        def splat(x):
            v = builder.insert_element(ir.Constant(f16, None), x, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, v, ir.Constant(_vt(16, _I32), [0] * 16))

        def store(vals, off):
            if bf:
                u = builder.bitcast(vals, _vt(16, _I32))
                c16 = ir.Constant(_vt(16, _I32), [16] * 16)
                odd = builder.and_(builder.lshr(u, c16), ir.Constant(_vt(16, _I32), [1] * 16))
                u = builder.add(u, builder.add(odd, ir.Constant(_vt(16, _I32), [0x7FFF] * 16)))
                vals = builder.trunc(builder.lshr(u, c16), _vt(16, _I16))
            builder.store(vals, _vptr(context, builder, t[6], out_, builder.add(ooff_, off),
                                      vals.type), align=2)

        def group(j):
            arr = context.make_array(t[2])(context, builder, s_).data
            sc = splat(builder.load(builder.gep(arr, [j])))
            if int4:
                zarr = context.make_array(t[3])(context, builder, z_).data
                zf = builder.uitofp(builder.load(builder.gep(zarr, [j])), _F32)
                mn = splat(builder.fmul(builder.fmul(zf, ir.Constant(_F32, -1 / 16)),
                                        builder.extract_element(sc, ir.Constant(_I32, 0))))
            base = builder.mul(j, g_)

            def chunk(c):
                c16 = builder.mul(c, ir.Constant(c.type, 16))
                boff = builder.add(builder.sdiv(base, ir.Constant(c.type, 2 if int4 else 1)),
                                   c16)
                v = builder.load(_vptr(context, builder, t[0], qw_, builder.add(qoff_, boff),
                                       v16), align=1)
                if not int4:
                    store(builder.fmul(builder.sitofp(v, f16), sc), builder.add(base, c16))
                    return
                half = builder.sdiv(g_, ir.Constant(g_.type, 2))
                for k, nib in enumerate((builder.and_(v, ir.Constant(v16, [15] * 16)),
                                         builder.lshr(v, ir.Constant(v16, [4] * 16)))):
                    w = builder.fadd(builder.fmul(builder.uitofp(nib, f16), sc), mn)
                    store(w, builder.add(builder.add(base, c16), half if k else
                                         ir.Constant(c.type, 0)))

            _loop(builder, per, chunk)

        _loop(builder, n_, group)
        return context.get_dummy_value()

    return sig, codegen


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
    """x (L, K) @ W.T → (L, M) float32 by tiles: dequantize rows, torch GEMM. bfloat16 x
    multiplies bfloat16 tiles (output rounded to bfloat16); any other x float32 tiles."""
    pq = prepare(q)
    M, K = pq.shape
    bf = x.dtype == torch.bfloat16
    xx = x.contiguous() if bf else x.float().contiguous()
    rows = max(16, TILE_BYTES // (K * (2 if bf else 4)))
    buf = np.empty((min(rows, M), K), np.uint16 if bf else np.float32)
    out = torch.empty(x.shape[0], M, dtype=torch.float32)
    for r0 in range(0, M, rows):
        n = min(rows, M - r0)
        _dequant_into(pq, r0, buf[:n])
        w = torch.from_numpy(buf[:n])
        out[:, r0:r0 + n] = xx @ (w.view(torch.bfloat16) if bf else w).T
    return out


def qmatmul(x: torch.Tensor, q: QTensor | CpuQ) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M) float32: gemv for L <= PREFILL_MIN, else prefill."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    return gemv(x, q) if x.shape[0] <= PREFILL_MIN else prefill(x, q)
