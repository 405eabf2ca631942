"""A fused group-dequantize GEMM in Triton: x (L, K) @ W.T for a weight in the stored layout
(qformat: int4-g{G} and int8-g{G}), reading each weight byte once and never writing a
dequantized weight. The cuda backend runs it for int8 weights and for int4 weights that
tinygemm does not take (compute capability < 8.0, ROCm, a torch build without tinygemm),
for up to FUSED_MAX_TOKENS tokens (beyond that the GEMM is compute-bound and cuBLAS on a
dequantized tile wins).

Per program: BLOCK_L tokens x BLOCK_M output rows; the K loop walks BLOCK_K stored columns
at a time (BLOCK_K bytes of a row; for int4 that is 2 * BLOCK_K weights). A weight is
rebuilt in registers exactly as qformat.dequantize does, in float32:

  int8  w = q * s                   s float16/bfloat16 per (row, group)
  int4  w = (q - zc / 16) * s       s from its e5m3 code by bit arithmetic (qformat
                                    .decode_scales: bits (c + 808) << 20), zc the zero code
        stored byte j of a group holds column j (low nibble) and j + G/2 (high nibble), so
        the low nibbles of BLOCK_K consecutive bytes meet x's columns g*G + j and the high
        ones g*G + G/2 + j: two dots, no interleave.

then rounded to the dot dtype (bf16 from compute capability 8.0, fp16 before: x is cast
with an overflow guard by the caller) and accumulated in float32 (tl.dot).

Bytes read per token: the stored weight, 1 + 2/G bytes a weight for int8 and 1/2 + 2/G for
int4, instead of the dequantize path's read + a float32 tile written and read back (~12 and
~18.6 bytes a weight).

Triton is optional: `available()` says whether the cuda backend runs this kernel on a device.
Its CPU twin is Triton's own interpreter: with TRITON_INTERPRET=1 set before triton is first
imported (`INTERPRETED`), `qmm` runs on CPU tensors, as the tests do (in float32 and float16:
the interpreter computes in numpy, which has no bfloat16).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch

from ..qformat import QTensor

try:  # optional: without it the cuda backend keeps its dequantize path
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
INTERPRETED = bool(triton is not None and triton.knobs.runtime.interpret)

# Shapes: L tokens · K in-features · M out-features · G group size · N = K // G groups

FUSED_MAX_TOKENS = 256  # more tokens: compute-bound, the dequantize tile + cuBLAS path
BLOCK_L, BLOCK_M = 16, 32  # tl.dot needs >= 16 a dimension; 32 rows: 160 programs for
# a 5120-row decode GEMV (an untuned choice: no GPU measured it yet)


def _kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, L, M, K, sx, sy,  # noqa: ANN001, ANN202
            G: tl.constexpr, INT4: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
            BL: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rl = tl.program_id(1) * BL + tl.arange(0, BL)  # (BL,) tokens
    rm = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,) output rows
    j = tl.arange(0, BK)  # (BK,) stored columns of this step
    ml, mm = rl < L, rm < M
    N = K // G
    acc = tl.zeros((BL, BM), dtype=tl.float32)
    if INT4:
        for c0 in range(0, K // 2, BK):
            c = c0 + j  # byte column
            g = c // (G // 2)  # its group
            lo = g * G + c % (G // 2)  # x column of the low nibble; the high one is + G/2
            b = tl.load(w_ptr + rm[:, None] * (K // 2) + c[None, :], mask=mm[:, None], other=0)
            b = b.to(tl.int32)
            sc = tl.load(s_ptr + rm[:, None] * N + g[None, :], mask=mm[:, None], other=0)
            s = ((sc.to(tl.int32) + 808) << 20).to(tl.float32, bitcast=True)  # e5m3 → float32
            z = tl.load(z_ptr + rm[:, None] * N + g[None, :], mask=mm[:, None], other=0)
            z = z.to(tl.float32) / 16
            w_lo = (((b & 15).to(tl.float32) - z) * s).to(DOT)  # (BM, BK)
            w_hi = (((b >> 4).to(tl.float32) - z) * s).to(DOT)
            x_lo = tl.load(x_ptr + rl[:, None] * sx + lo[None, :], mask=ml[:, None], other=0)
            x_hi = tl.load(x_ptr + rl[:, None] * sx + (lo + G // 2)[None, :], mask=ml[:, None],
                           other=0)
            acc += tl.dot(x_lo.to(DOT), tl.trans(w_lo), input_precision=PREC)
            acc += tl.dot(x_hi.to(DOT), tl.trans(w_hi), input_precision=PREC)
    else:
        for c0 in range(0, K, BK):
            c = c0 + j
            q = tl.load(w_ptr + rm[:, None] * K + c[None, :], mask=mm[:, None], other=0)
            s = tl.load(s_ptr + rm[:, None] * N + (c // G)[None, :], mask=mm[:, None], other=0)
            w = (q.to(tl.float32) * s.to(tl.float32)).to(DOT)  # (BM, BK)
            x = tl.load(x_ptr + rl[:, None] * sx + c[None, :], mask=ml[:, None], other=0)
            acc += tl.dot(x.to(DOT), tl.trans(w), input_precision=PREC)
    tl.store(y_ptr + rl[:, None] * sy + rm[None, :], acc, mask=ml[:, None] & mm[None, :])


def available(device: torch.device) -> bool:
    """Whether the cuda backend runs this kernel on `device`: Triton installed and the device
    a GPU (CUDA or ROCm). On the CPU the backend's twins keep the dequantize path, even under
    the interpreter (which would run the whole test suite's twins at numpy speed); tests that
    want the kernel there call `qmm` directly or patch this function."""
    return triton is not None and device.type == "cuda"


@cache
def _compiled() -> Any:
    return triton.jit(_kernel)


def block_k(q: QTensor) -> int:
    """Stored columns per K step: the widest of 64, 32, 16 dividing a row of bytes (K or
    K / 2 is a multiple of 16: G >= 32)."""
    width = q.shape[1] // 2 if q.spec.bits == 4 else q.shape[1]
    return next(b for b in (64, 32, 16) if width % b == 0)


_DOT = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def qmm(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x (L, K) in the dot dtype (float16 or bfloat16; float32 exact under the interpreter)
    @ W.T → (L, M) float32, W as stored in q (on x's device; `available` for it)."""
    L, K = x.shape
    M = q.shape[0]
    assert K == q.shape[1] and x.dtype in _DOT, (tuple(x.shape), q.shape, x.dtype)
    x = x.contiguous()
    y = torch.empty(L, M, dtype=torch.float32, device=x.device)
    int4 = q.spec.bits == 4
    z = q.zeros if int4 else q.scales  # an unused pointer for int8
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(L, BLOCK_L))
    _compiled()[grid](x, q.qweight, q.scales, z, y, L, M, K, x.stride(0), y.stride(0),
                               G=q.spec.group_size, INT4=int4,
                               DOT=getattr(tl, _DOT[x.dtype]),
                               PREC="ieee" if x.dtype == torch.float32 else None,  # no tf32
                               BL=BLOCK_L, BM=BLOCK_M,
                               BK=block_k(q))
    return y
