"""The numba cpu backend against its reference twins (kernels/ref.py) over odd shapes, both
bit widths, all group sizes, float32 and bfloat16 inputs; the dispatch around them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixlocal import kernels
from pixlocal.kernels import ref
from pixlocal.qformat import GROUP_SIZES, QTensor, QuantSpec, dequantize
from pixlocal.quant.quantizer import quantize

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
    for L in (1, 2, 7, 9):  # one-token passes; cpu.TOKENS at a time plus a tail
        x = _x(L, K, dtype, seed=L)
        y = cpu.gemv(x, cpu.prepare(q))
        assert y.shape == (L, M) and y.dtype == torch.float32
        size = x.float().abs() @ dequantize(q).abs().T  # (L, M)
        assert ((y - ref.gemv(x, q)).abs() <= SAME_ACT_RTOL * size).all()
        assert ((y - ref.qmatmul(x, q)).abs() <= _act_bound(x, q)).all()
        if not cpu.uses_tiles(L, spec.bits):  # qmatmul takes gemv
            torch.testing.assert_close(kernels.qmatmul(x, q, "cpu"), y, rtol=0, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_prefill_and_dequantize_rows_match_ref(spec):
    M, K = 70, 5 * spec.group_size
    q = _q(M, K, spec, seed=3)
    pq = cpu.prepare(q)
    for dt in (torch.float32, torch.bfloat16):  # dequantization is exact: equal bits
        assert torch.equal(cpu.dequantize_rows(pq, 3, 68, dt), ref.dequantize_rows(q, 3, 68, dt))
    x = _x(300, K, torch.float32)
    y = cpu.prefill(x, pq)  # tiles + GEMM
    torch.testing.assert_close(y, ref.qmatmul(x, q), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    assert _rel(cpu.prefill(xb, pq), ref.prefill(xb, q)) <= BF16_RTOL
    # qmatmul: tiles where cpu.TILES and L > PREFILL_MIN, else the integer loop
    tiles = cpu.uses_tiles(300, spec.bits)
    assert torch.equal(cpu.qmatmul(x, pq), cpu.prefill(x, pq) if tiles else cpu.gemv(x, pq))


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


def test_prepare_repacks_once_and_dispatch():
    """prepare interleaves blocks of ROWS rows (padded with zero rows) and is idempotent;
    qmatmul takes the prepared weight or the QTensor alike."""
    for bits, M in ((4, 16), (8, 21)):
        q = _q(M, 64, QuantSpec(bits, 32))
        pq = kernels.prepare(q, "cpu")
        assert cpu.prepare(pq) is pq
        Mb = -(-M // cpu.ROWS)
        assert pq.qweight.shape == (Mb, cpu.ROWS * q.qweight.shape[1])
        assert pq.qweight.ctypes.data != q.qweight.data_ptr()  # a copy: the loader frees pages
        blocks = pq.qweight.reshape(Mb, -1, cpu.ROWS, 4)  # (block, dword, row, byte)
        rows = blocks.transpose(0, 2, 1, 3).reshape(Mb * cpu.ROWS, -1)
        assert np.array_equal(rows[:M], q.qweight.view(torch.uint8).numpy()) and not rows[M:].any()
        x = _x(1, 64, torch.float32)
        assert torch.equal(kernels.qmatmul(x, pq, "cpu"), kernels.qmatmul(x, q, "cpu"))
    assert kernels.prepare(q, "ref") is q


def test_default_backend(monkeypatch):
    monkeypatch.delenv("PIXLOCAL_BACKEND", raising=False)
    assert kernels.default_backend("cpu") == ("cpu" if cpu.SIMD else "ref")
    assert kernels.default_backend(torch.device("meta")) == "ref"
    monkeypatch.setenv("PIXLOCAL_BACKEND", "ref")
    assert kernels.default_backend("cpu") == "ref"
    monkeypatch.setenv("PIXLOCAL_BACKEND", "fast")
    with pytest.raises(ValueError, match="unknown qmatmul backend"):
        kernels.default_backend("cpu")


def test_simd_inner_loops_are_integer_multiply_adds():
    """The IR inner loops compile to x86 integer multiply-adds (vpdpbusd where the CPU has
    VNNI, else vpmaddubsw/vpmaddwd and AVX2 vpsignb for int8), vectorized: compiled fresh
    here because numba does not show the assembly of cached code."""
    import numba

    if not cpu.SIMD:
        pytest.skip("no AVX2/AVX-512 on this host")

    @numba.njit
    def probe(qw, sz, a, f, out):
        cpu._q4t1(qw, 0, sz, 0, a, 0, 0, f, f, 0, 0, 1, 32, 0, out, 0, 0)
        cpu._q8tn(qw.view(np.int8), 0, sz.view(np.uint16), 0, a, 0, 0, f, f, 0, 0, 1, 32, 0,
                  out, 0, 0)

    R = cpu.ROWS  # one block: G=32 int8 columns of R rows, R results
    z8, f, out = np.zeros(32 * R, np.uint8), np.zeros(4, np.float32), np.ones(R, np.float32)
    probe(z8, z8, z8.view(np.int8), f, out)
    assert not out.any()
    asm = "\n".join(probe.inspect_asm().values())
    if cpu.VNNI:  # u8 x s8 dots straight into i32 lanes
        assert "vpdpbusd" in asm and "vpmaddubsw" not in asm, "VNNI dots not used"
    else:
        assert "vpmaddubsw" in asm and "vpsignb" in asm, "int4/int8 dots not vectorized"
        assert "vpmaddwd" in asm, "no i16 → i32 multiply-add"
    assert ("zmm" if R == 16 else "ymm") in asm  # 512-bit loops for 16-row blocks


def _block_runner(blk, T: int, rows: int):  # noqa: ANN001, ANN202
    """A jitted loop calling one llir.block variant over every row block, T tokens a pass."""
    import numba

    @numba.njit
    def run(qw, sz, a, d, e, G, bf, out):  # noqa: ANN001
        K, N, Mp = a.shape[1], d.shape[1], out.shape[1]
        for b in range(qw.shape[0]):
            for t in range(0, a.shape[0], T):
                blk(qw, b * qw.shape[1], sz, b * sz.shape[1], a, t * K, K, d, e, t * N, N, N,
                    G, bf, out, t * Mp + b * rows, Mp)
    return run


@pytest.mark.parametrize(("vnni", "rows"), [(False, 8), (True, 8), (True, 16)],
                         ids=["avx2", "vnni256", "vnni512"])
def test_every_block_variant_matches_ref(vnni, rows):
    """The AVX2 loops and the 256- and 512-bit VNNI loops agree with ref.gemv wherever the
    host runs them (a VNNI host runs the AVX2 ones too, so all stay tested on one machine),
    and so does dequantization from each block size."""
    from pixlocal.kernels import llir

    if not cpu.SIMD or (vnni and not cpu.VNNI) or (rows == 16 and cpu.ROWS != 16):
        pytest.skip("this host lacks the instructions")
    assert llir.ROWS == 8 and llir.ROWS512 == 16
    for bits in (4, 8):
        for T in (1, cpu.TOKENS):
            run = _block_runner(cpu._block(bits, T, vnni, rows), T, rows)
            for G in (32, 128):
                q = _q(20, 3 * G, QuantSpec(bits, G), seed=G + bits)
                pq, x = cpu.prepare(q, rows), _x(2 * cpu.TOKENS, 3 * G, torch.float32, seed=T)
                assert pq.rows == rows
                a, d, asum = (t.numpy() for t in cpu.quantize_activation(x, G))
                e = d * asum.astype(np.float32) / np.float32(16)
                out = np.zeros((x.shape[0], pq.qweight.shape[0] * rows), np.float32)
                run(pq.qweight, pq.sz, a, d, e, G, pq.bf16, out)
                size = x.abs() @ dequantize(q).abs().T
                err = (torch.from_numpy(out[:, :20]) - ref.gemv(x, q)).abs()
                assert (err <= SAME_ACT_RTOL * size).all(), (bits, T, G)
                assert torch.equal(cpu.dequantize_rows(pq, 3, 19), dequantize(q)[3:19])


def test_numba_cache_is_keyed_on_every_kernel_source(tmp_path, monkeypatch):
    """numba keys a cached function on its own file, yet cpu.py's kernels embed llir.py's
    loops and cpu_decode's layer embeds cpu.py's and cpu_attn.py's kernels: the cache
    directory is named by a digest of all kernel sources (jit.py), so editing any of them
    starts a fresh cache instead of running a stale one."""
    import shutil

    import numba

    from pixlocal.kernels import jit

    assert numba.config.CACHE_DIR == str(jit.cache_dir())
    assert jit.cache_dir().name == jit.sources_digest()
    copy = tmp_path / "kernels"
    shutil.copytree(jit.HERE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(jit, "HERE", copy)
    before = jit.sources_digest()
    (copy / "llir.py").write_text((copy / "llir.py").read_text() + "\n# edited\n")
    assert jit.sources_digest() != before


def test_uncompiled_kernels_are_known_before_the_first_call(tmp_path):
    """What the CLI announces as "compiling CPU kernels": a fresh cache lists the kernel;
    once called it is compiled, and a new process finds it in the disk cache."""
    import subprocess
    import sys

    code = ("import sys, torch; from pixlocal.kernels import cpu, jit; from pixlocal.qformat "
            "import QuantSpec; from pixlocal.quant.quantizer import quantize; "
            "print('_gemv' in jit.uncompiled()); "
            "q = cpu.prepare(quantize(torch.randn(32, 64), QuantSpec(4, 32))); "
            "cpu.gemv(torch.randn(1, 64), q); print('_gemv' in jit.uncompiled())")
    env = {**__import__("os").environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300) for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["True", "False"], ["False", "False"]], \
        runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
