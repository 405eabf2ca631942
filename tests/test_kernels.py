"""The numba cpu backend against its reference twins (kernels/ref.py) over odd shapes, both
bit widths, all group sizes, float32 and bfloat16 inputs; the dispatch around them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixlocal import kernels
from pixlocal.kernels import ref
from pixlocal.qformat import GROUP_SIZES, QTensor, QuantSpec, dequantize, quantize

cpu = pytest.importorskip("pixlocal.kernels.cpu")

# gemv vs ref.gemv: both multiply the *same* int8 activations by the same weights; the cpu
# kernel sums exact int32 dots per group in float32 in another order. Measured against the
# size of the sum, |x| @ |W|.T (so cancellation cannot inflate it): observed <= 1e-6;
# 1e-5 leaves headroom and still catches any wrong group, scale, zero point or nibble
# (those are O(1e-2) and up).
SAME_ACT_RTOL = 1e-5
# gemv vs the float path (ref.qmatmul): rounding x to a * d moves each element by at most
# d/2, so |Δy_i| <= sum_g d_g/2 * sum_(j in g) |w_ij| exactly (`_act_bound`); the observed
# error is ~1/10 of it. The bound is a proof, not a fit: the cost of int8 activations.
# bfloat16 prefill vs ref.prefill: the same bf16 weights and inputs through torch's GEMM, in
# tiles of rows vs all at once; outputs rounded to bf16 (2^-8 relative) may differ by an ulp.
BF16_RTOL = 1e-2

SPECS = [QuantSpec(b, g) for b in (4, 8) for g in GROUP_SIZES]
# (M, K in groups): M not a multiple of the 64-row block; K below one SIMD chunk, chunks plus
# a tail group, and several chunks.
SHAPES = [(1, 3), (37, 3), (70, 5), (130, 12)]


def _q(M: int, K: int, spec: QuantSpec, seed: int = 0) -> QTensor:
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(M, K, generator=g) * 0.05, spec)


def _x(L: int, K: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(L, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _act_bound(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """(L, M) worst-case |x_q @ W.T - x @ W.T| for int8 activations, plus float rounding."""
    _, d, _ = ref.quantize_activation(x, q.spec.group_size)
    half = (d / 2).repeat_interleave(q.spec.group_size, dim=1)  # (L, K)
    w = dequantize(q).abs()
    return half @ w.T + SAME_ACT_RTOL * (x.float().abs() @ w.T)


def _rel(y: torch.Tensor, want: torch.Tensor) -> float:
    return float((y.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}g")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_gemv_matches_ref(spec, shape, dtype):
    M, K = shape[0], shape[1] * spec.group_size
    q = _q(M, K, spec)
    for L in (1, 2, 7):
        x = _x(L, K, dtype, seed=L)
        y = cpu.gemv(x, cpu.prepare(q))
        assert y.shape == (L, M) and y.dtype == torch.float32
        size = x.float().abs() @ dequantize(q).abs().T  # (L, M)
        assert ((y - ref.gemv(x, q)).abs() <= SAME_ACT_RTOL * size).all()
        assert ((y - ref.qmatmul(x, q)).abs() <= _act_bound(x, q)).all()
        torch.testing.assert_close(kernels.qmatmul(x, q, "cpu"), y, rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_prefill_and_dequantize_rows_match_ref(spec):
    M, K = 70, 5 * spec.group_size
    q = _q(M, K, spec, seed=3)
    pq = cpu.prepare(q)
    for dt in (torch.float32, torch.bfloat16):  # dequantization is exact: equal bits
        assert torch.equal(cpu.dequantize_rows(pq, 3, 68, dt), ref.dequantize_rows(q, 3, 68, dt))
    x = _x(300, K, torch.float32)
    y = cpu.qmatmul(x, pq)  # L = 300 > PREFILL_MIN: tiles + GEMM
    torch.testing.assert_close(y, ref.qmatmul(x, q), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    assert _rel(cpu.qmatmul(xb, pq), ref.prefill(xb, q)) <= BF16_RTOL


def test_prefill_tiles_cover_all_rows(monkeypatch):
    """Many tiles, the last one partial: every row lands in its column of the output."""
    monkeypatch.setattr(cpu, "TILE_BYTES", 16 * 96 * 4)  # 16 rows per tile
    q = _q(75, 96, QuantSpec(4, 32), seed=5)
    x = _x(20, 96, torch.float32)
    torch.testing.assert_close(cpu.prefill(x, q), ref.qmatmul(x, q), rtol=1e-5, atol=1e-5)


def test_quantize_activation_matches_ref():
    x = _x(5, 256, torch.float32) * torch.tensor([0.0] * 32 + [1.0] * 224)  # a zero group
    x[0, 32:64] = x[0, 32:64].clamp(-100, 100)
    x[0, 33], x[0, 40], x[0, 41], x[0, 42] = 127.0, 2.5, 3.5, -2.5  # d = 1: exact ties
    got, want = cpu.quantize_activation(x, 32), ref.quantize_activation(x, 32)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)
    a, d, s = got
    assert (d[:, 0] == 0).all() and (a[:, :32] == 0).all() and d[0, 1] == 1.0
    assert a[0, 40:43].tolist() == [2, 4, -2]  # round half to even
    assert torch.equal(s, a.view(5, 8, 32).sum(-1, dtype=torch.int32))


def test_int8_bfloat16_scales():
    q = _q(40, 128, QuantSpec(8, 32))
    q = QTensor(q.qweight, q.scales.bfloat16(), None, q.shape, q.spec)
    x = _x(3, 128, torch.float32)
    assert _rel(cpu.gemv(x, q), ref.gemv(x, q)) <= SAME_ACT_RTOL
    assert torch.equal(cpu.dequantize_rows(q, 0, 40), dequantize(q))


def test_prepare_is_zero_copy_and_dispatch():
    q = _q(16, 64, QuantSpec(4, 32))
    pq = kernels.prepare(q, "cpu")
    assert pq.qweight.ctypes.data == q.qweight.data_ptr()  # no copy: no extra resident bytes
    assert pq.scales.ctypes.data == q.scales.data_ptr()
    assert kernels.prepare(q, "ref") is q
    x = _x(1, 64, torch.float32)
    assert torch.equal(kernels.qmatmul(x, pq, "cpu"), kernels.qmatmul(x, q, "cpu"))


def test_default_backend(monkeypatch):
    monkeypatch.delenv("PIXLOCAL_BACKEND", raising=False)
    assert kernels.default_backend("cpu") == ("cpu" if cpu.SIMD else "ref")
    assert kernels.default_backend(torch.device("meta")) == "ref"
    monkeypatch.setenv("PIXLOCAL_BACKEND", "ref")
    assert kernels.default_backend("cpu") == "ref"
    monkeypatch.setenv("PIXLOCAL_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown qmatmul backend"):
        kernels.default_backend("cpu")


def test_threads(monkeypatch):
    import numba

    assert cpu.physical_cores() >= 1
    try:
        monkeypatch.setenv("PIXLOCAL_THREADS", "1")
        assert cpu.set_threads() == 1 and numba.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    finally:
        monkeypatch.delenv("PIXLOCAL_THREADS")
        cpu.set_threads()
    assert numba.get_num_threads() == min(cpu.physical_cores(), numba.config.NUMBA_NUM_THREADS)


def test_simd_inner_loops_are_integer_multiply_adds():
    """The IR inner loops compile to x86 integer multiply-adds (vpmaddubsw/vpmaddwd or their
    VNNI forms vpdp*), vectorized: compiled fresh here because numba does not show the
    assembly of cached code."""
    import numba

    if not cpu.SIMD:
        pytest.skip("no AVX2/AVX-512 on this host")

    @numba.njit
    def probe(qw, lo, hi, f, a16):
        return (cpu._q4dot(qw, 0, lo, hi, f, 1, 32)
                + cpu._q8dot(qw.view(np.int8), 0, a16, f, 1, 32))

    z8, f = np.zeros(64, np.uint8), np.zeros(32, np.float32)
    assert probe(z8, z8.view(np.int8), z8.view(np.int8), f, np.zeros(64, np.int16)) == 0
    asm = "\n".join(probe.inspect_asm().values())
    reg = "zmm" if cpu.SIMD == 64 else "ymm"
    assert any(op in asm for op in ("vpmaddubsw", "vpdpbusd")), "int4 dot not vectorized"
    assert any(op in asm for op in ("vpmaddwd", "vpdpwssd")), "int8 dot not vectorized"
    assert reg in asm
