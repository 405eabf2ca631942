"""The cpu backend's weight layout: which decode loops this host runs (SIMD, VNNI, ROWS) and
the repack of a QTensor into their interleaved row blocks (`prepare`, done once at load),
plus `fuse`, which stacks layers that share an input (cpu.py's kernels read both)."""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.binding as llvm
import numpy as np
import torch
from numba import njit, prange

from ..qformat import QTensor
from . import llir

_FEAT = llvm.get_host_cpu_features()
SIMD = 32 if _FEAT.get("avx2") else 0  # vector bytes of the decode loops (AVX2; 0: none)
VNNI = bool(SIMD and (_FEAT.get("avx512vnni") and _FEAT.get("avx512vl") or _FEAT.get("avxvnni")))
# 16-row blocks and 512-bit loops where AVX-512 has VNNI, else 8 rows and 256 bits
ROWS = llir.ROWS512 if VNNI and _FEAT.get("avx512vnni") and _FEAT.get("avx512bw") else llir.ROWS


@njit(parallel=True, cache=True)
def _interleave(w, out):
    """w (M, D) uint32 rows → out (Mb, D, R): dword i of the block's R rows side by side;
    rows past M are zero."""
    M, D = w.shape
    R = out.shape[2]
    for b in prange(out.shape[0]):
        for r in range(R):
            m = b * R + r
            if m < M:
                for i in range(D):
                    out[b, i, r] = w[m, i]
            else:
                for i in range(D):
                    out[b, i, r] = 0


@dataclass(eq=False)
class CpuQ:
    """A QTensor as the cpu kernels read it, repacked once (`prepare`): blocks of R = rows
    (ROWS for this host's loops) whose dwords are interleaved (qweight (Mb, R * row bytes)
    uint8: dword i of rows 0..R-1 of the block, then dword i+1, ...) and the block's
    per-group scales side by side (sz: int4 (Mb, N*2R) uint8, R e5m3 scale codes then R zero
    codes per group; int8 (Mb, N*R) uint16 float16/bfloat16 bits). Mb = ceil(M / R); padding
    rows are zero."""

    qweight: np.ndarray
    sz: np.ndarray
    bf16: bool  # int8 scales are bfloat16 (else float16)
    shape: tuple[int, int]
    spec: object  # QuantSpec

    @property
    def rows(self) -> int:
        return self.qweight.shape[1] * (2 if self.spec.bits == 4 else 1) // self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the weight streams."""
        return int(self.qweight.nbytes + self.sz.nbytes)


def _np(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"cpu backend got a tensor on {t.device}")
    return t.detach().contiguous().numpy()


def _side_by_side(a: np.ndarray, Mb: int, R: int) -> np.ndarray:
    """(M, N) per-row values → (Mb, N, R): row r of block b at [b, :, r]; zero padded."""
    M, N = a.shape
    p = np.zeros((Mb * R, N), a.dtype)
    p[:M] = a
    return p.reshape(Mb, R, N).transpose(0, 2, 1)


def prepare(q: QTensor | CpuQ, rows: int = ROWS) -> CpuQ:
    """Repack a QTensor for the cpu kernels in blocks of `rows` (a copy of the same size as
    the stored weight; the loader then drops the file's mapped pages)."""
    if isinstance(q, CpuQ):
        return q
    if not SIMD:
        raise RuntimeError("the cpu backend needs AVX2; use PIXLOCAL_BACKEND=ref")
    M, _ = q.shape
    Mb = -(-M // rows)
    w = _np(q.qweight)
    w32 = w.view(np.uint32) if w.shape[1] % 4 == 0 and w.ctypes.data % 4 == 0 else \
        np.ascontiguousarray(w).copy().view(np.uint32)
    # numpy backs large arrays by transparent huge pages (madvise): decode streams them with
    # fewer TLB misses. A lone gemv ran 6-36% faster than from torch's 4 KiB pages, most where
    # the read rate was high; decode 2% (8-layer Nemo, both in one process). The price on a
    # VM: ~2 ms to first touch each fresh 2 MiB page (the host backing new guest memory),
    # 8-layer load 5.8-8.7 s against 2.2-2.6 s with 4 KiB pages; little on bare metal.
    # MADV_COLLAPSE after a 4 KiB fill was slower still (bench/README.md, fourth session).
    qw = np.empty((Mb, w32.shape[1], rows), np.uint32)
    _interleave(w32, qw)
    if q.zeros is None:
        bf = q.scales.dtype == torch.bfloat16
        sc = _np(q.scales.view(torch.int16)).view(np.uint16)
        sz = _side_by_side(sc, Mb, rows)
    else:
        bf = False
        sz = np.concatenate([_side_by_side(_np(q.scales), Mb, rows),
                             _side_by_side(_np(q.zeros), Mb, rows)], axis=2)
    return CpuQ(qw.reshape(Mb, -1).view(np.uint8), np.ascontiguousarray(sz).reshape(Mb, -1),
                bf, q.shape, q.spec)


def fuse(pqs: list[CpuQ]) -> tuple[CpuQ, list[CpuQ]] | None:
    """Weights of one layout (bits, G, K, scale dtype), whole row blocks, stacked into one
    CpuQ (a copy; views into it replace the inputs): wq/wk/wv or w1/w3 in one call, one
    thread launch (50-100 us on a 2-core VM) instead of three or two. None if they differ."""
    p0 = pqs[0]
    if any(p.spec != p0.spec or p.bf16 != p0.bf16 or p.shape[1] != p0.shape[1]
           or p.rows != p0.rows or p.shape[0] % p.rows for p in pqs):
        return None
    qw, sz = np.concatenate([p.qweight for p in pqs]), np.concatenate([p.sz for p in pqs])
    views, b0 = [], 0
    for p in pqs:
        b1 = b0 + p.qweight.shape[0]
        views.append(CpuQ(qw[b0:b1], sz[b0:b1], p.bf16, p.shape, p.spec))
        b0 = b1
    return CpuQ(qw, sz, p0.bf16, (sum(p.shape[0] for p in pqs), p0.shape[1]), p0.spec), views
