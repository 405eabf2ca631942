"""QLinear on the cpu backend: same results as on the reference backend, output dtype follows
the input, the weight is prepared once per set of buffers."""

from __future__ import annotations

import pytest
import torch

from pixlocal import kernels
from pixlocal.qformat import QuantSpec, dequantize
from pixlocal.layers import Projections
from pixlocal.qlinear import Fused, QLinear
from pixlocal.quant.quantizer import quantize

cpu = pytest.importorskip("pixlocal.kernels.cpu")

# The integer loop (decode, and prefill where bfloat16 is emulated) quantizes activations to
# int8: bounded by the same worst case as in test_kernels (d/2 per element times sum |w|); on
# these inputs the observed error is under 1e-2 of max|y|, and 3e-2 is used for it. Prefill
# by tiles in float32 is the reference's math (observed 1e-6); bfloat16 rounds input,
# weights and output to 8 bits: 2e-2 of max|y|.
DECODE_RTOL = 3e-2
PREFILL_F32_RTOL = 1e-5
BF16_RTOL = 2e-2


def from_linear(lin: torch.nn.Linear, spec: QuantSpec, backend: str = "ref") -> QLinear:
    """A QLinear holding `lin`'s weight quantized with `spec`, and its bias."""
    return QLinear.from_qtensor(quantize(lin.weight, spec), lin.bias, backend)


def _rel(y: torch.Tensor, want: torch.Tensor) -> float:
    return float((y.float() - want.float()).abs().max() / want.float().abs().max())


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8, 64), QuantSpec(4, 128)],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_qlinear_matches_ref(spec, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 77, bias=bias)
    ql_cpu = from_linear(lin, spec, "cpu")
    ql_ref = QLinear.from_qtensor(ql_cpu.qtensor(), lin.bias, backend="ref")
    with torch.no_grad():
        tiles = PREFILL_F32_RTOL if cpu.uses_tiles(80, spec.bits) else DECODE_RTOL  # L=2x40
        for L, tol in ((1, DECODE_RTOL), (5, DECODE_RTOL), (40, tiles)):
            x = torch.randn(2, L, 256)
            y = ql_cpu(x)
            assert y.shape == (2, L, 77) and y.dtype == torch.float32
            assert _rel(y, ql_ref(x)) <= tol, L
            xb = x.bfloat16()
            yb = ql_cpu(xb)
            assert yb.dtype == torch.bfloat16
            assert _rel(yb, ql_ref(xb.float())) <= max(tol, BF16_RTOL), L


def test_prepared_once_per_buffers():
    spec = QuantSpec(4, 32)
    ql = from_linear(torch.nn.Linear(64, 8, bias=False), spec, "cpu")
    x = torch.randn(3, 64)
    y = ql(x)
    first = ql.prepared()
    assert isinstance(first, cpu.CpuQ) and ql.prepared() is first
    # new buffers (load_state_dict with assign) → prepared again, from the new weights
    other = from_linear(torch.nn.Linear(64, 8, bias=False), spec)
    ql.load_state_dict(other.state_dict(), assign=True)
    assert ql.prepared() is not first
    torch.testing.assert_close(ql(x), kernels.qmatmul(x, other.qtensor(), "cpu"))
    assert not torch.equal(ql(x), y)
    ql.backend = "ref"  # another backend → its own prepared form
    assert ql.prepared().qweight is ql.qweight  # ref reads the QTensor as stored
    torch.testing.assert_close(ql(x), x @ dequantize(other.qtensor()).T)


def test_loader_fuses_projections_with_the_same_results(tmp_path, tiny_ckpt):
    """On the cpu backend the loader stacks wq/wk/wv and w1/w3 (one kernel call each): the
    decode logits are those of the layers called one by one, bit for bit; a layer whose
    backend changes makes its Fused fall back to the layers."""
    from pixlocal.quant import quantize_checkpoint

    import pixlocal

    if kernels.default_backend("cpu") != "cpu":
        pytest.skip("no cpu backend on this host")
    quantize_checkpoint(tiny_ckpt, tmp_path / "q", bits=4)
    m = pixlocal.load(tmp_path / "q", dtype="float32")
    layers = list(m.model.layers)
    assert all(isinstance(b.attention.qkv, Fused) and isinstance(b.feed_forward.w13, Fused)
               for b in layers)
    m.fast_decode = None  # the modules' own path (test_cpu_decode: the layer kernel)
    enc = m.encode([{"role": "user", "content": "Hello there"}])

    def run() -> list[torch.Tensor]:
        m.reset()
        out = [m.prefill(enc)]
        for _ in range(3):
            out.append(m.decode(int(out[-1].argmax())))
        return out

    fused = run()
    saved = [(b.attention.qkv, b.feed_forward.w13) for b in layers]
    for b in layers:
        b.attention.qkv = Projections(b.attention, "wq", "wk", "wv")
        b.feed_forward.w13 = Projections(b.feed_forward, "w1", "w3")
    apart = run()
    assert all(torch.equal(a, b) for a, b in zip(fused[1:], apart[1:], strict=True))
    torch.testing.assert_close(fused[0], apart[0], rtol=1e-4, atol=1e-4)
    for b, (qkv, w13) in zip(layers, saved, strict=True):
        b.attention.qkv, b.feed_forward.w13 = qkv, w13
        b.attention.wq.backend = "ref"  # re-prepares: its Fused must not use the stacked copy
    got = run()[1]  # wq in float math now, the rest int8 activations: close, not equal
    assert not torch.equal(got, apart[1])
    assert torch.corrcoef(torch.stack([got, apart[1]]))[0, 1] > 0.999
