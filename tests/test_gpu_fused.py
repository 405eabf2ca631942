"""The fused group-dequantize GEMM (kernels/cuda_fused.py): on the CPU through Triton's own
interpreter, on a GPU compiled. int8 and int4 weights in the stored layout, against the
reference; and the cuda backend choosing it instead of dequantizing whole weights per call."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede triton's first import (cuda_fused's)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pixlocal.quant.quantizer import quantize  # noqa: E402

from pixlocal.kernels import cuda, cuda_fused, ref  # noqa: E402
from pixlocal.qformat import QTensor, QuantSpec  # noqa: E402

pytestmark = pytest.mark.skipif(
    cuda_fused.triton is None or not (cuda_fused.INTERPRETED or torch.cuda.is_available()),
    reason="needs triton (the test extra), interpreted on a CPU host or compiled on CUDA")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# float32 dots (the interpreter) are exact but for the order of float32 sums; float16 inputs
# carry 11 significant bits: ~1e-3 relative on sums of a few hundred terms, 1e-2 of the max
# leaves headroom and still catches a wrong nibble, scale or zero (errors of order 1)
F32_REL, HALF_REL = 1e-5, 1e-2


def _q(M: int, K: int, bits: int, G: int, seed: int = 0) -> QTensor:
    g = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(M, K, generator=g), QuantSpec(bits, G))
    return QTensor(q.qweight.to(DEV), q.scales.to(DEV),
                   None if q.zeros is None else q.zeros.to(DEV), q.shape, q.spec)


def _rel(y: torch.Tensor, r: torch.Tensor) -> float:
    return float((y.cpu() - r.cpu()).abs().max() / r.abs().max())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,K,G,L", [(70, 256, 32, 3), (64, 384, 128, 20), (16, 128, 64, 1),
                                     (96, 192, 64, 17)])
def test_fused_kernel_matches_the_reference(bits, M, K, G, L):
    """Odd row counts (a ragged last block), every group size, tokens across blocks."""
    q = _q(M, K, bits, G, seed=M + L)
    x = torch.randn(L, K, generator=torch.Generator().manual_seed(L))
    want = ref.qmatmul(x, q)
    dt = torch.float32 if DEV == "cpu" else torch.bfloat16
    y = cuda_fused.qmm(x.to(DEV, dt), q)
    assert y.shape == (L, M) and y.dtype == torch.float32
    assert _rel(y, want) < (F32_REL if dt == torch.float32 else HALF_REL)
    assert _rel(cuda_fused.qmm(x.to(DEV, torch.float16), q), want) < HALF_REL


@pytest.mark.parametrize("bits", [4, 8])
def test_the_cuda_backend_runs_it_instead_of_dequantizing_per_call(bits, monkeypatch):
    """int8 (and int4 where tinygemm is missing: here below capability 8.0) used to be
    dequantized whole, to float32, every token: ~12 (int8-g32) and ~18.6 (int4) bytes
    written a weight. The fused kernel reads the stored bytes only."""
    if bits == 4:
        monkeypatch.setattr(cuda, "capability", lambda d: (7, 5))
    if DEV == "cpu":  # the interpreter stands in for the GPU (cuda_fused.available)
        monkeypatch.setattr(cuda_fused, "available", lambda d: True)
    monkeypatch.setattr(cuda, "dequantize_rows", lambda *a: pytest.fail("dequantized"))
    q = _q(64, 256, bits, 32)
    p = cuda.prepare(q)
    assert p is q  # the stored layout is what the kernel reads: nothing copied
    for L in (1, 16, cuda.FUSED_MAX_TOKENS):
        x = torch.randn(L, 256)
        y = cuda.qmatmul(x.to(DEV), p)
        assert _rel(y, ref.qmatmul(x, q)) < HALF_REL
    assert cuda.FUSED_MAX_TOKENS == cuda_fused.FUSED_MAX_TOKENS

