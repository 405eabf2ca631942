"""The quantized format: bit layout (golden), round trips, refusals, QTensor I/O, the ref
qmatmul and QLinear."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pixlocal import kernels
from pixlocal import qformat as qf
from pixlocal.quant import quantizer
from pixlocal.errors import FormatError
from pixlocal.qformat import QTensor, QuantSpec, dequantize, dequantize_ref
from pixlocal.quant.quantizer import quantize, quantize_ref
from pixlocal.qlinear import QLinear

GOLDEN = Path(__file__).parent / "golden" / "qformat_layout.json"
SPECS = [QuantSpec(b, g) for b in (4, 8) for g in (32, 64, 128)]

# Relative RMS error ||W - Ŵ|| / ||W|| of quantize() on a seeded (64, 512) standard normal
# matrix. Measured: int4 g32/g64/g128 0.0733/0.0851/0.0959, int8 0.00482/0.00557/0.00625;
# bounds are ~8% above, so a worse search or a layout bug fails while reseeding does not.
ROUNDTRIP_REL_RMSE = {(4, 32): 0.080, (4, 64): 0.092, (4, 128): 0.104,
                      (8, 32): 0.0053, (8, 64): 0.0060, (8, 128): 0.0068}
# QLinear vs nn.Linear on the same dequantized weight: both are one float32 matmul over
# identical inputs, so only summation order differs (K <= 256, |x|, |w| ~ 1).
QLINEAR_ATOL = 1e-5
# bfloat16 activations: the output is rounded to bfloat16 (8 bits), relative 2^-8.
QLINEAR_BF16_RTOL = 2**-7


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rel_err(w: torch.Tensor, q: QTensor) -> float:
    return ((dequantize(q) - w).norm() / w.norm()).item()


# ---- spec --------------------------------------------------------------------------------

def test_spec_names_parse_default():
    assert QuantSpec.parse("int4-g64") == QuantSpec(4, 64)
    assert QuantSpec.parse(" INT8-G128 ") == QuantSpec(8, 128)
    assert QuantSpec.parse("int8") == QuantSpec.default(8) == QuantSpec(8, 32)
    assert QuantSpec.default() == QuantSpec.default(4) == QuantSpec(4, 32)
    assert QuantSpec(4, 64).name == "int4-g64" and QuantSpec(4, 64, search=False).name == "int4-g64"
    assert QuantSpec(4, 32).asymmetric and not QuantSpec(8, 32).asymmetric
    for s in SPECS:
        assert QuantSpec.parse(s.name) == s


@pytest.mark.parametrize("text", ["int3-g32", "int4-g48", "fp8", "int4-", "", "int8-g0"])
def test_spec_rejects_unknown(text):
    with pytest.raises(FormatError):
        QuantSpec.parse(text)


def test_format_constants():
    assert qf.FORMAT_NAME == "pixlocal" and qf.FORMAT_VERSION == 1


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_bits_per_weight(spec):
    expected = {(4, 32): 4.5, (4, 64): 4.25, (4, 128): 4.125,
                (8, 32): 8.5, (8, 64): 8.25, (8, 128): 8.125}[spec.bits, spec.group_size]
    q = quantize(randn(3, 256), spec)
    assert q.bits_per_weight == spec.bits_per_weight == expected


# ---- bit layout --------------------------------------------------------------------------

def golden_cases():
    return json.loads(GOLDEN.read_text())["cases"]


@pytest.mark.parametrize("case", golden_cases(), ids=lambda c: c["scheme"])
def test_bit_layout_golden(case):
    """quantize_ref of a 2 x 64 matrix of known values gives exactly the stored bytes and
    codes (regenerate: python tests/golden/regen_qformat.py, then review the diff)."""
    assert json.loads(GOLDEN.read_text())["format_version"] == qf.FORMAT_VERSION
    w = torch.tensor(case["weight"])
    q = quantize_ref(w, QuantSpec.parse(case["scheme"]))
    assert [bytes(r.view(torch.uint8).tolist()).hex() for r in q.qweight] == case["qweight_hex"]
    if q.zeros is not None:
        assert q.scales.dtype == q.zeros.dtype == torch.uint8
        assert q.scales.tolist() == case["scales"] and q.zeros.tolist() == case["zeros"]
    else:
        assert q.scales.dtype == torch.float16
        assert [bytes(r.view(torch.uint8).tolist()).hex() for r in q.scales] == case["scales"]
    assert dequantize(q).tolist() == case["dequant"]  # exact: dequantization is exact in f32


def test_int4_nibble_order_by_hand():
    """Byte j of group g holds column g*G + j (low nibble) and g*G + j + G/2 (high)."""
    G = 32
    q = (torch.arange(64) * 7 % 16).view(1, 64)  # (M=1, K=64), two groups
    packed = qf.pack_int4(q, G)
    for g in range(2):
        for j in range(G // 2):
            b = packed[0, g * G // 2 + j].item()
            assert b & 0x0F == q[0, g * G + j] and b >> 4 == q[0, g * G + j + G // 2]
    assert torch.equal(qf.unpack_int4(packed, G), q.to(torch.uint8))


def test_int4_known_codes_by_hand():
    """Row 0, group 0 of the golden matrix worked out on paper from the docstring:
    w = (k - 24)/32 for k < 32: lo = -0.75, hi = 0.21875, range/15 = 0.06458; the next code up
    is e=22, f=1: s = 1.125 * 2^-4 = 0.0703125 (code 177); z = round(0.75/s * 16)/16 =
    171/16; q(k=0) = round(-0.75/s + 10.6875) = 0, q(k=31) = round(3.111 + 10.6875) = 14."""
    k = torch.arange(64)
    w = ((k - 24) / 32).view(1, 64)
    q = quantize_ref(w, QuantSpec(4, 32))
    assert q.scales[0, 0] == 177 and qf.decode_scales(q.scales[0, 0]).item() == 0.0703125
    assert q.zeros[0, 0] == 171
    first, last = q.qweight[0, 0].item(), q.qweight[0, 15].item()
    assert first & 0x0F == 0 and last >> 4 == 14  # columns 0 and 31


def test_e5m3_scale_codes():
    c = torch.arange(256, dtype=torch.int32)
    s = qf.decode_scales(c)
    assert s[0] == qf.SCALE_MIN == 2.0**-26 and s[255] == qf.SCALE_MAX == 60.0
    assert s[208] == 1.0 and s[209] == 1.125 and s[207] == 0.9375
    assert (s[1:] > s[:-1]).all()
    assert torch.equal(qf.scale_code_floor(s), c)  # codes round-trip
    assert torch.equal(qf.scale_code_floor(s * 1.01)[:-1], c[:-1])  # floor, not nearest
    assert qf.scale_code_floor(torch.tensor([0.0, 1e-30, 1e9])).tolist() == [0, 0, 255]


# ---- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_roundtrip_error_bounds(spec):
    w = randn(64, 512)
    e_search, e_ref = rel_err(w, quantize(w, spec)), rel_err(w, quantize_ref(w, spec))
    assert e_search <= ROUNDTRIP_REL_RMSE[spec.bits, spec.group_size], (e_search, e_ref)
    assert e_search < e_ref, (e_search, e_ref)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_dequantize_matches_ref(spec):
    q = quantize(randn(5, 256) * 0.02, spec)
    assert torch.equal(dequantize(q), dequantize_ref(q))
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, 64)], ids=lambda s: s.name)
def test_chunking_does_not_change_result(spec, monkeypatch):
    w = randn(37, 256)
    whole = quantize(w, spec)
    monkeypatch.setattr(quantizer, "_CHUNK", 3 * 256)  # 3 rows a chunk: 13 chunks, a short last one
    chunked = quantize(w, spec)
    for a, b in zip(whole.tensors("x").values(), chunked.tensors("x").values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, 128)], ids=lambda s: s.name)
def test_result_does_not_depend_on_thread_count(spec):
    w = randn(64, 512)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize(w, spec)
    finally:
        torch.set_num_threads(n)
    many = quantize(w, spec)
    for a, b in zip(one.tensors("x").values(), many.tensors("x").values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", SPECS[:3] + SPECS[3:4], ids=lambda s: s.name)
@pytest.mark.parametrize("M", [1, 7, 33])
def test_odd_row_counts(spec, M):
    w = randn(M, 256, seed=M)
    q = quantize(w, spec)
    assert q.shape == (M, 256) and dequantize(q).shape == (M, 256)
    assert rel_err(w, q) <= ROUNDTRIP_REL_RMSE[spec.bits, spec.group_size] * 1.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_input_dtypes(dtype):
    w = (randn(8, 128) * 0.02).to(dtype)
    for bits in (4, 8):
        q = quantize(w, QuantSpec.default(bits))
        assert rel_err(w.float(), q) < ROUNDTRIP_REL_RMSE[bits, 32]


# ---- refusals and edge cases -------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_k_not_multiple_of_group_raises(spec):
    w = randn(4, spec.group_size + 16)
    for fn in (quantize, quantize_ref):
        with pytest.raises(FormatError, match="multiple of the group size"):
            fn(w, spec)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("bits", [4, 8])
def test_nan_inf_raise(bad, bits):
    w = randn(9, 128)
    w[7, 100] = bad
    for fn in (quantize, quantize_ref):
        with pytest.raises(FormatError, match="NaN or inf"):
            fn(w, QuantSpec.default(bits))


def test_not_a_matrix_raises():
    with pytest.raises(FormatError):
        quantize(randn(64), QuantSpec.default())
    with pytest.raises(FormatError):
        quantize(torch.ones(2, 64, dtype=torch.int32), QuantSpec.default())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_zero_groups_are_exact(spec):
    w = randn(4, 256)
    w[1] = 0  # a whole row
    w[2, : spec.group_size] = 0  # one group
    for fn in (quantize, quantize_ref):
        d = dequantize(fn(w, spec))
        assert (d[1] == 0).all() and (d[2, : spec.group_size] == 0).all()
    assert (dequantize(quantize(torch.zeros(3, 128), spec)) == 0).all()


@pytest.mark.parametrize("value", [0.3, -0.02, 7.0])
def test_constant_int4_group(value):
    """A constant group has no spread to fit: it falls back to s = range / 15 and must land
    within s/32 of the value (z has 1/16-step resolution)."""
    w = torch.full((2, 64), value)
    d = dequantize(quantize(w, QuantSpec(4, 32)))
    assert ((d - value).abs() <= abs(value) / 15 / 32 * 1.2).all(), d


def test_int8_scale_dtype_follows_range():
    """float16 scales normally; bfloat16 for a tensor whose scales leave float16's normal
    range (absmax/127 < 2^-14 or > 65504), and then still accurate."""
    w = randn(4, 128)
    assert quantize(w, QuantSpec(8, 32)).scales.dtype == torch.float16
    for scale in (1e-7, 1e7):
        for fn in (quantize, quantize_ref):
            q = fn(w * scale, QuantSpec(8, 32))
            assert q.scales.dtype == torch.bfloat16
            assert rel_err(w * scale, q) < ROUNDTRIP_REL_RMSE[8, 32] * 1.5


def test_int4_scale_range_limits():
    """e5m3 scales cover 2^-26 .. 60: a group spanning more than 15 * 60 is refused, and so is
    a tensor so small that no group reaches 2^-16; a tiny group next to normal ones is fine."""
    w = randn(4, 64)
    with pytest.raises(FormatError, match="scale range"):
        quantize(w * 1000, QuantSpec(4, 32))
    with pytest.raises(FormatError, match="scale range"):
        quantize(w * 1e-7, QuantSpec(4, 32))
    w[0, :32] *= 1e-9
    q = quantize(w, QuantSpec(4, 32))
    assert (dequantize(q)[0, :32] - w[0, :32]).abs().max() <= qf.SCALE_MIN


# ---- QTensor I/O and metadata ------------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_tensors_roundtrip_through_safetensors(spec, tmp_path):
    q = quantize(randn(6, 256), spec)
    t = q.tensors("layers.0.attention.wq")
    assert set(t) == {f"layers.0.attention.wq.{k}" for k in
                      (("qweight", "scales", "zeros") if spec.bits == 4 else ("qweight", "scales"))}
    save_file(t, tmp_path / "x.safetensors", metadata=qf.make_metadata(spec, "abc"))
    back = QTensor.from_tensors("layers.0.attention.wq", load_file(tmp_path / "x.safetensors"))
    assert back.spec == spec and back.shape == q.shape
    assert torch.equal(dequantize(back), dequantize(q))
    QTensor.from_tensors("layers.0.attention.wq", t, spec)  # agreeing spec is fine


def test_from_tensors_refuses_inconsistent():
    t = quantize(randn(6, 256), QuantSpec(4, 64)).tensors("w")
    with pytest.raises(FormatError, match="stored as int4-g64, expected int4-g32"):
        QTensor.from_tensors("w", t, QuantSpec(4, 32))
    with pytest.raises(FormatError, match="lacks"):
        QTensor.from_tensors("w", {"w.qweight": t["w.qweight"]})
    bad = dict(t, **{"w.scales": t["w.scales"].float()})
    with pytest.raises(FormatError, match="inconsistent"):
        QTensor.from_tensors("w", bad)
    bad = {k: v for k, v in t.items() if k != "w.zeros"}
    with pytest.raises(FormatError, match="inconsistent"):
        QTensor.from_tensors("w", bad)
    bad = dict(t, **{"w.scales": t["w.scales"][:, :3]})  # K / 3 groups: no valid group size
    with pytest.raises(FormatError):
        QTensor.from_tensors("w", bad)


def test_metadata():
    md = qf.make_metadata(QuantSpec(4, 64), "deadbeef")
    assert md == {"format": "pixlocal", "format_version": "1", "quant": "int4-g64",
                  "source": "deadbeef"}
    assert qf.read_metadata(md) == QuantSpec(4, 64)
    with pytest.raises(FormatError, match="pixlocal quantize"):
        qf.read_metadata(dict(md, format_version="2"), "shard.safetensors")
    with pytest.raises(FormatError, match="not a pixlocal"):
        qf.read_metadata(None)


# ---- reference qmatmul and QLinear -------------------------------------------------------

@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_ref_qmatmul(spec):
    q = quantize(randn(33, 256) * 0.05, spec)
    x = randn(3, 256, seed=1)
    y = kernels.qmatmul(x, q)
    assert y.shape == (3, 33) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ dequantize(q).T, atol=QLINEAR_ATOL, rtol=0)
    with pytest.raises(ValueError, match="unknown qmatmul backend"):
        kernels.qmatmul(x, q, backend="nope")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("bias", [False, True])
def test_qlinear_equals_linear_on_dequantized_weight(spec, bias):
    lin = torch.nn.Linear(256, 17, bias=bias)
    ql = QLinear.from_qtensor(quantize(lin.weight, spec), lin.bias)
    ref = torch.nn.Linear(256, 17, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(dequantize(ql.qtensor()))
        if bias:
            ref.bias.copy_(lin.bias)
    x = randn(2, 5, 256, seed=2)  # (B, L, K): leading dims pass through
    with torch.no_grad():
        torch.testing.assert_close(ql(x), ref(x), atol=QLINEAR_ATOL, rtol=0)
        xb = x.bfloat16()
        yb = ql(xb)
        assert yb.dtype == torch.bfloat16 and yb.shape == (2, 5, 17)
        torch.testing.assert_close(yb.float(), ref(xb.float()), rtol=QLINEAR_BF16_RTOL,
                                   atol=QLINEAR_BF16_RTOL)


def test_qlinear_state_dict_matches_shard_names():
    spec = QuantSpec(4, 32)
    q = quantize(randn(8, 64), spec)
    ql = QLinear.from_qtensor(q)
    assert set(ql.state_dict()) == {k.removeprefix("w.") for k in q.tensors("w")}
    empty = QLinear(64, 8, spec, device="meta")
    empty.load_state_dict({k.removeprefix("w."): v for k, v in q.tensors("w").items()},
                          assign=True)
    x = randn(3, 64)
    assert torch.equal(empty(x), ql(x))
    with pytest.raises(FormatError):
        QLinear(48, 8, spec)
