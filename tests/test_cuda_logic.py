"""The CUDA backend's logic on CPU (the ops' CPU twins), and its real kernels when CUDA is here."""

from __future__ import annotations

import pytest
import torch

from pixlocal.kernels import cuda, ref
from pixlocal.qformat import QuantSpec, dequantize, unpack_int4
from pixlocal.qlinear import QLinear
from pixlocal.quant.quantizer import quantize


def from_linear(lin: torch.nn.Linear, spec: QuantSpec, backend: str = "ref") -> QLinear:
    """A QLinear holding `lin`'s weight quantized with `spec`, and its bias."""
    return QLinear.from_qtensor(quantize(lin.weight, spec), lin.bias, backend)


# bf16 activations (8 significant bits) and bf16 zero points: relative error of a dot
# product of a few hundred terms stays ~1e-3; 1e-2 of the output's max leaves 5x headroom and
# still catches a wrong nibble or scale (those give errors of order 1).
BF16_REL = 1e-2


def _q(M: int, K: int, bits: int, G: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(M, K, generator=g), QuantSpec(bits, G))


def _rel(y: torch.Tensor, r: torch.Tensor) -> float:
    return float((y - r).abs().max() / r.abs().max())


@pytest.mark.parametrize("G", [32, 64, 128])
def test_scale_zero_pairs_reproduce_our_weights_exactly(G):
    q = _q(24, 256, 4, G)
    sz = cuda.scale_zero_pairs(q)  # (K/G, M, 2) float32
    assert sz.shape == (256 // G, 24, 2)
    v = unpack_int4(q.qweight, G).float().view(24, 256 // G, G)
    w = (v - 8) * sz.transpose(0, 1)[..., :1] + sz.transpose(0, 1)[..., 1:]
    assert torch.equal(w.view(24, 256), dequantize(q))
    # the bf16 pair costs at most s/64 per weight (module docstring)
    w16 = cuda.dequantize_rows(cuda.prepare(_q(32, 256, 4, G)), 0, 32, torch.float32)
    q2 = _q(32, 256, 4, G)
    s = cuda.scale_zero_pairs(q2)[..., 0].T.repeat_interleave(G, 1)  # (M, K)
    assert bool(((w16 - dequantize(q2)).abs() <= s / 64 + 1e-12).all())


def test_cuda_packer_input_nibble_order():
    vals = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    b = cuda.tinygemm_nibbles(vals)
    assert b.dtype == torch.uint8 and b.shape == (8, 32)
    assert torch.equal((b >> 4).int(), vals[:, 0::2]) and torch.equal((b & 15).int(), vals[:, 1::2])


def test_int32_nibbles_order():
    w = torch.tensor([[0x76543210, 0x0FEDCBA9]], dtype=torch.int32)
    want = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 0]
    assert cuda.int32_nibbles(w).tolist() == [want]


def _fake_packer(secret: torch.Tensor, ikt: int):
    """A stand-in for the CUDA packer with tinygemm's block structure and an arbitrary
    in-block permutation `secret` (stored nibble j = tile value secret[j])."""
    def pack(values: torch.Tensor) -> torch.Tensor:
        M, K = values.shape
        C = 16 * ikt
        tiles = values.view(M // 8, 8, K // C, C).transpose(1, 2).reshape(M // 8, K // C, -1)
        nib = tiles[..., secret].view(M // 8, K // C, -1, 8).to(torch.int64)
        words = (nib << torch.arange(0, 32, 4)).sum(-1)  # 8 nibbles → one 32-bit word
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return words.view(M // 8, K // C, 32, ikt // 2)
    return pack


@pytest.mark.parametrize("ikt", [2, 4, 8])
def test_block_permutation_is_learnt_and_inverted(ikt):
    g = torch.Generator().manual_seed(ikt)
    secret = torch.randperm(8 * 16 * ikt, generator=g)
    pack = _fake_packer(secret, ikt)
    perm = cuda.learn_block_perm(pack, ikt, "cpu")
    assert torch.equal(perm, secret)
    M, K, G = 32, 16 * ikt * 3, 32
    q = _q(M, K, 4, G)
    vals = unpack_int4(q.qweight, G).to(torch.int32)
    p = cuda.TinyGemmQTensor(pack(vals), cuda.scale_zero_pairs(q).bfloat16(), None, q.shape,
                             q.spec, ikt, perm)
    assert torch.equal(cuda.packed_values(p, 8, 24).int(), vals[8:24])
    assert torch.equal(cuda.packed_values(p, 0, M).int(), vals)


def test_learn_block_perm_rejects_a_packer_that_loses_values():
    bad = _fake_packer(torch.zeros(8 * 16 * 2, dtype=torch.int64), 2)
    with pytest.raises(AssertionError, match="block permutation"):
        cuda.learn_block_perm(bad, 2, "cpu")


def test_kernel_choice():
    assert cuda.inner_k_tiles(5120) == 8 and cuda.inner_k_tiles(14336) == 8
    assert cuda.inner_k_tiles(96) == 2 and cuda.inner_k_tiles(48) is None
    ampere, turing = (8, 6), (7, 5)
    assert cuda.kernel_for(4, (5120, 14336), 1, ampere) == "tinygemm-int4"
    assert cuda.kernel_for(4, (5120, 14336), 16, ampere) == "tinygemm-int4"
    assert cuda.kernel_for(4, (5120, 14336), 17, ampere) == "tinygemm-int4-chunked"
    assert cuda.kernel_for(4, (5120, 14336), 256, ampere) == "tinygemm-int4-chunked"
    assert cuda.kernel_for(4, (5120, 14336), 257, ampere) == "dequant-gemm-bfloat16"
    assert cuda.kernel_for(4, (5120, 14336), 1, turing) == "dequant-gemm-float16"
    assert cuda.kernel_for(4, (5120, 14336), 1, turing, fused=True) == "fused-dequant-float16"
    assert cuda.kernel_for(4, (5120, 14336), 1, ampere, tinygemm=False,
                           fused=True) == "fused-dequant-bfloat16"
    assert cuda.kernel_for(8, (5120, 14336), 1, ampere) == "dequant-gemm-bfloat16"
    assert cuda.kernel_for(8, (5120, 14336), 200, ampere, fused=True) == "fused-dequant-bfloat16"
    assert cuda.kernel_for(8, (5120, 14336), 1024, ampere, fused=True) == "dequant-gemm-bfloat16"
    assert cuda.kernel_for(4, (5124, 14336), 1, ampere) == "dequant-gemm-bfloat16"
    assert cuda.kernel_for(4, (8, 256), 1, ampere) == "tinygemm-int4"
    assert cuda.kernel_for(4, (8, 256), 1, None) == "dequant-gemm-float32"  # CPU twin: 16 rows


@pytest.mark.parametrize("M,K,G", [(64, 256, 32), (48, 128, 128), (32, 384, 64), (16, 96, 32)])
@pytest.mark.parametrize("L", [1, 5, 40])
def test_prepared_int4_matches_reference_on_cpu_twins(M, K, G, L):
    q = _q(M, K, 4, G, seed=M + K)
    p = cuda.prepare(q)
    assert isinstance(p, cuda.TinyGemmQTensor) and p.zeros is None
    assert p.scales.dtype == torch.bfloat16 and p.scales.shape == (K // G, M, 2)
    x = torch.randn(L, K, generator=torch.Generator().manual_seed(L))
    y = cuda.qmatmul(x, p)
    assert y.shape == (L, M) and y.dtype == torch.float32
    assert _rel(y, ref.qmatmul(x, q)) < BF16_REL


def test_decode_and_prefill_paths_agree():
    q = _q(64, 512, 4, 32)
    p = cuda.prepare(q)
    x = torch.randn(cuda.TINYGEMM_CHUNKED_MAX_TOKENS + 4, 512)
    full = cuda.qmatmul(x, p)  # dequantize-tile path
    rows = torch.cat([cuda.qmatmul(x[i:i + 1], p) for i in range(x.shape[0])])  # tinygemm
    assert _rel(rows, full) < BF16_REL


@pytest.mark.parametrize("L", [17, 40, 200])
def test_a_chat_turn_runs_tinygemm_in_16_token_chunks(L, monkeypatch):
    """17..256 tokens (a chat turn) go through tinygemm 16 at a time: no call dequantizes
    the packed weight (which moves ~30 bytes a weight, module docstring), and the answer is
    tinygemm's own, token for token."""
    q = _q(64, 512, 4, 32)
    p = cuda.prepare(q)
    calls = []
    real = cuda._int4mm
    monkeypatch.setattr(cuda, "_int4mm", lambda x, *a: calls.append(x.shape[0]) or real(x, *a))
    monkeypatch.setattr(cuda, "dequantize_rows", lambda *a: pytest.fail("dequantized"))
    x = torch.randn(L, 512, generator=torch.Generator().manual_seed(L))
    y = cuda.qmatmul(x, p)
    assert calls == [16] * (L // 16) + ([L % 16] if L % 16 else [])
    assert _rel(y, ref.qmatmul(x, q)) < BF16_REL
    one = torch.cat([real(x[i:i + 1].bfloat16(), p.qweight, 32, p.scales) for i in (0, L - 1)])
    torch.testing.assert_close(y[[0, L - 1]], one.float(), rtol=0, atol=0)


@pytest.mark.parametrize("bits,G", [(8, 32), (8, 128), (4, 64)])
def test_unprepared_weights_take_the_dequantize_path_exactly(bits, G, monkeypatch):
    monkeypatch.setattr(cuda, "TILE_ELEMS", 8 * 256)  # several tiles, a ragged last one
    q = _q(44, 256, bits, G)
    assert cuda.prepare(q) is q or bits == 4
    x = torch.randn(7, 256)
    torch.testing.assert_close(cuda.qmatmul(x, q), ref.qmatmul(x, q), rtol=1e-5, atol=1e-5)


def test_prepare_leaves_unsupported_weights_alone():
    for q in (_q(20, 96, 4, 32), _q(32, 256, 8, 32)):  # 20 rows: no 16-row tiles; int8
        assert cuda.prepare(q) is q
    p = cuda.prepare(_q(32, 256, 4, 32))
    assert cuda.prepare(p) is p


# ---- GPUs below compute capability 8.0, ROCm and tinygemm-less builds (capability mocked) ------

TURING = (7, 5)


@pytest.fixture
def turing(monkeypatch):
    """The CPU twins as a compute capability 7.5 card would run them."""
    monkeypatch.setattr(cuda, "capability", lambda d: TURING)
    return TURING


def test_below_8_0_a_bf16_load_computes_in_fp16(turing):
    from pixlocal.kernels.backend import get
    b = get("cuda")
    assert b.compute_dtype(torch.device("cpu"), torch.bfloat16) == torch.float16
    assert b.compute_dtype(torch.device("cpu"), torch.float32) == torch.float32
    assert cuda.compute_dtype(torch.bfloat16, (8, 6)) == torch.bfloat16


@pytest.mark.parametrize("bits", [4, 8])
def test_fp16_dequantize_path_guards_the_cast(turing, bits):
    """A bf16 hidden state beyond fp16's range (bf16 reaches 3e38) is scaled into range on
    its way into the fp16 GEMM and back after, not turned into inf (which poisons every
    later layer), and the rest keeps its accuracy."""
    q = _q(32, 256, bits, 32)
    p = cuda.prepare(q)
    assert p is q  # below 8.0: no tinygemm, the stored layout
    x = torch.randn(3, 256).bfloat16()
    x[1, 7] = 1e6
    y = cuda.qmatmul(x, p)
    assert bool(torch.isfinite(y).all())
    want = ref.qmatmul(x.float(), q)
    assert _rel(y, want) < BF16_REL and _rel(y[[0, 2]], want[[0, 2]]) < BF16_REL


def test_rocm_is_refused_tinygemm_in_one_line_and_falls_back(monkeypatch):
    """ROCm's packer tiles 16 rows: the 8-row probe would write out of bounds. int4 keeps its
    stored layout there (the fused or dequantize kernels read it) and says why in one line."""
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    why = cuda.tinygemm_missing("cpu")
    assert why is not None and "ROCm" in why and "\n" not in why
    q = _q(32, 256, 4, 32)
    assert cuda.prepare(q) is q
    x = torch.randn(2, 256)
    torch.testing.assert_close(cuda.qmatmul(x, q), ref.qmatmul(x, q), rtol=1e-5, atol=1e-5)


def test_a_build_without_tinygemm_is_refused_at_load_not_at_first_use(monkeypatch):
    """A torch built for CUDA 11.8 lacks the int4 ops (they raise): found by a probe at the
    first prepare, int4 then keeps its stored layout instead of failing mid-answer."""
    def missing(*a):
        raise RuntimeError("_convert_weight_to_int4pack: no kernel image for this build")
    monkeypatch.setattr(cuda, "_MISSING", {})
    monkeypatch.setattr(cuda, "_int4pack", missing)
    why = cuda.tinygemm_missing("cpu")
    assert why is not None and "no working tinygemm" in why and "\n" not in why
    q = _q(32, 256, 4, 32)
    assert cuda.prepare(q) is q
    x = torch.randn(20, 256)
    torch.testing.assert_close(cuda.qmatmul(x, q), ref.qmatmul(x, q), rtol=1e-5, atol=1e-5)


# ---- attention in the call shapes of torch's fused CUDA kernels ------------------------------

def _sdpa_calls(monkeypatch):
    """Record each call of scaled_dot_product_attention (the outermost: torch's own
    dispatch of a CausalBias calls it again, and needs the real function in place)."""
    F = torch.nn.functional
    real, calls = F.scaled_dot_product_attention, []

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append(dict(q=q, k=k, mask=attn_mask, causal=is_causal, gqa=enable_gqa))
        F.scaled_dot_product_attention = real
        try:
            return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                        enable_gqa=enable_gqa, **kw)
        finally:
            F.scaled_dot_product_attention = spy
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("L,S", [(1, 9), (6, 6), (5, 12)])
def test_cuda_attention_takes_a_fused_kernel_and_answers_as_before(L, S, monkeypatch):
    """Prefill with a cached prefix (L < S) used a bool mask with enable_gqa: flash takes no
    mask, memory-efficient attention no GQA, so torch ran its math kernel. Now: K/V repeated
    to H heads and a lower-right causal bias (no mask tensor); a decode token without GQA
    (flash, which has it, needs capability 8.0); same numbers."""
    from torch.nn.attention.bias import CausalBias, CausalVariant

    from pixlocal.kernels.backend import get
    from pixlocal.layers import attention
    H, Hkv, Dh = 8, 2, 16
    g = torch.Generator().manual_seed(L)
    q = torch.randn(H, L, Dh, generator=g)
    k, v = torch.randn(Hkv, 20, Dh, generator=g), torch.randn(Hkv, 20, Dh, generator=g)
    want = attention(q, k, v, S)
    calls = _sdpa_calls(monkeypatch)
    got = get("cuda").attention(q, k, v, S)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (c,) = calls
    assert c["q"].dim() == 4 and c["k"].shape[-2] == S  # batched, the attended keys only
    if L == 1:  # the grouped query heads as rows of their KV head: nothing to mask
        assert c["mask"] is None and not c["causal"] and not c["gqa"]
        assert c["q"].shape == (1, Hkv, H // Hkv, Dh) and c["k"].shape[1] == Hkv
    else:
        assert c["k"].shape[1] == H and not c["gqa"]
        assert not isinstance(c["mask"], torch.Tensor) or isinstance(c["mask"], CausalBias)
        if S == L:
            assert c["causal"] and c["mask"] is None
        else:
            assert isinstance(c["mask"], CausalBias)
            assert c["mask"].variant == CausalVariant.LOWER_RIGHT


def test_cuda_attention_below_8_0_runs_in_fp16(turing, monkeypatch):
    from pixlocal.kernels.backend import get
    from pixlocal.layers import attention
    q = torch.randn(8, 5, 16).bfloat16()
    k, v = torch.randn(2, 12, 16).bfloat16(), torch.randn(2, 12, 16).bfloat16()
    calls = _sdpa_calls(monkeypatch)
    got = get("cuda").attention(q, k, v, 12)
    assert calls[0]["q"].dtype == torch.float16 and calls[0]["k"].dtype == torch.float16
    assert got.dtype == torch.bfloat16
    want = attention(q.float(), k.float(), v.float(), 12)
    assert _rel(got.float(), want) < BF16_REL


# ---- real kernels ----------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("L", [1, 4, 64])
def test_cuda_int4_matches_reference(G, L):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs compute capability >= 8.0")
    q = _q(256, 1024, 4, G)
    dq = type(q)(q.qweight.cuda(), q.scales.cuda(), q.zeros.cuda(), q.shape, q.spec)
    p = cuda.prepare(dq)
    assert isinstance(p, cuda.TinyGemmQTensor) and p.perm is not None
    assert torch.equal(cuda.packed_values(p, 0, 256).cpu().int(),
                       unpack_int4(q.qweight, G).int())
    x = torch.randn(L, 1024)
    y = cuda.qmatmul(x.cuda(), p).cpu()
    assert _rel(y, ref.qmatmul(x, q)) < BF16_REL


@pytest.mark.gpu
@gpu
def test_cuda_int8_matches_reference():
    q = _q(256, 1024, 8, 32)
    dq = type(q)(q.qweight.cuda(), q.scales.cuda(), None, q.shape, q.spec)
    x = torch.randn(3, 1024)
    assert _rel(cuda.qmatmul(x.cuda(), dq).cpu(), ref.qmatmul(x, q)) < BF16_REL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("L,S", [(1, 300), (64, 64), (40, 300)])
def test_cuda_attention_never_falls_back_to_the_math_kernel(L, S):
    """With only the fused kernels allowed, every call shape runs (a math fallback raises),
    and answers as the float32 math does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pixlocal.kernels.cuda_attn import attention as cuda_attention
    from pixlocal.layers import attention
    H, Hkv, Dh = 32, 8, 128
    q = torch.randn(H, L, Dh, device="cuda")
    k, v = torch.randn(Hkv, S + 5, Dh, device="cuda"), torch.randn(Hkv, S + 5, Dh, device="cuda")
    half = cuda.compute_dtype(torch.bfloat16, torch.cuda.get_device_capability())
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.CUDNN_ATTENTION]):
        got = cuda_attention(q.to(half), k.to(half), v.to(half), S)
    want = attention(q, k, v, S)
    assert _rel(got.float(), want) < BF16_REL


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_weights_in_the_stored_layout_take_the_fused_kernel(bits, monkeypatch):
    """int8 (and int4, tinygemm refused here as on ROCm) on a CUDA device: Triton's fused
    kernel, never a whole-weight dequantization, for decode and a chat turn."""
    from pixlocal.kernels import cuda_fused
    if not cuda_fused.available(torch.device("cuda")):
        pytest.skip("needs triton")
    if bits == 4:
        monkeypatch.setattr(cuda, "tinygemm_missing", lambda d: "refused for the test")
    monkeypatch.setattr(cuda, "dequantize_rows", lambda *a: pytest.fail("dequantized"))
    q = _q(256, 1024, bits, 32)
    dq = type(q)(q.qweight.cuda(), q.scales.cuda(), None if q.zeros is None else
                 q.zeros.cuda(), q.shape, q.spec)
    assert cuda.prepare(dq) is dq
    for L in (1, 40):
        x = torch.randn(L, 1024)
        assert _rel(cuda.qmatmul(x.cuda(), dq).cpu(), ref.qmatmul(x, q)) < BF16_REL


@pytest.mark.gpu
@gpu
def test_cuda_chat_turn_through_chunked_tinygemm():
    if cuda.tinygemm_missing("cuda") is not None:
        pytest.skip(cuda.tinygemm_missing("cuda"))
    q = _q(256, 1024, 4, 32)
    dq = type(q)(q.qweight.cuda(), q.scales.cuda(), q.zeros.cuda(), q.shape, q.spec)
    p = cuda.prepare(dq)
    assert isinstance(p, cuda.TinyGemmQTensor)
    x = torch.randn(40, 1024)
    assert _rel(cuda.qmatmul(x.cuda(), p).cpu(), ref.qmatmul(x, q)) < BF16_REL


def test_bytes_per_token_count_what_the_kernels_read_not_the_emptied_buffers():
    """On a GPU the loader empties a tinygemm layer's buffers (one copy in VRAM): bench's
    bytes/token must count the packed weight and its bf16 (scale, zero) pairs, not 0."""
    from pixlocal.cli.bench import decode_bytes_per_token
    M, K, G = 64, 256, 32
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].w = from_linear(torch.nn.Linear(K, M, bias=False), QuantSpec(4, G), "cuda")
    model.layers[0].w.prepare()
    model.layers[0].w.drop_source()
    packed = M * K // 2 + (K // G) * M * 2 * 2  # nibbles + bf16 pairs
    assert model.layers[0].w.nbytes == packed
    assert decode_bytes_per_token(model) == packed
    int8 = from_linear(torch.nn.Linear(K, M, bias=False), QuantSpec(8, G), "cuda")
    assert int8.nbytes == M * K + (K // G) * M * 2  # the stored layout the kernels read


def test_qlinear_on_the_cuda_backend_keeps_one_copy_of_the_weight():
    """tinygemm's repack replaces the stored layout: prepare() says it copied, and the loader
    then drops the buffers (else the weight takes twice its size in VRAM); the module keeps
    answering. int8 computes from its buffers: no copy, nothing to drop."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 256, generator=g)
    for bits, copied in ((4, True), (8, False)):
        lin = torch.nn.Linear(256, 64, bias=True)
        m = from_linear(lin, QuantSpec(bits, 32), "cuda")
        want = ref.qmatmul(x, m.qtensor()) + m.bias
        assert m.prepare() is copied and m.backend.copies_weights
        y1 = m(x)
        if copied:
            m.drop_source()
            assert m.qweight.numel() == 0 and m.scales.numel() == 0
        y2 = m(x)  # prepared once; the emptied buffers are not re-prepared
        assert _rel(y1, want) < BF16_REL and torch.equal(y1, y2)
    # a change of backend after the release cannot re-prepare: it says so
    m = from_linear(torch.nn.Linear(256, 64), QuantSpec(4, 32), "cuda")
    m.drop_source()
    m.backend = "ref"
    with pytest.raises(RuntimeError, match="released"):
        m(x)
