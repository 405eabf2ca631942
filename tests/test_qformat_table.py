"""qformat.SCHEMES is the one statement of each scheme's tensors: what quantize writes, what
QTensor.from_tensors accepts, what QLinear allocates and what memory counts all agree with it."""

from __future__ import annotations

import pytest
import torch

from pixlocal import memory
from pixlocal.config import PixtralArgs
from pixlocal.qformat import (
    GROUP_SIZES,
    INT8_SCALE_DTYPE,
    QTensor,
    QuantSpec,
    stored_tensors,
)
from pixlocal.qlinear import QLinear
from pixlocal.quant.quantizer import quantize_ref

SPECS = [QuantSpec(b, g) for b in (4, 8) for g in GROUP_SIZES]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_quantized_tensors_follow_the_table(spec):
    M, K = 3, 256
    q = quantize_ref(torch.randn(M, K, generator=torch.Generator().manual_seed(0)), spec)
    got = [(n, t.dtype, tuple(t.shape)) for n, t in q.tensors("l.w").items()]
    assert got == stored_tensors("l.w.weight", (M, K), spec)
    assert sum(t.numel() * t.element_size() for t in q.tensors("x").values()) \
        == spec.nbytes((M, K)) == spec.bits_per_weight * M * K / 8
    lin = QLinear(K, M, spec, device="meta")
    assert [(n, b.dtype, tuple(b.shape)) for n, b in lin.named_buffers()] == [
        (s, d, shape) for s, d, shape in spec.layout((M, K))]
    assert (lin.zeros is None) == (spec.bits == 8)


def test_int8_scale_dtype_and_float_rows():
    spec = QuantSpec(8, 32)
    assert spec.layout((2, 64))[1] == ("scales", INT8_SCALE_DTYPE, (2, 2))
    assert spec.layout((2, 64), torch.bfloat16)[1] == ("scales", torch.bfloat16, (2, 2))
    assert QuantSpec(4, 32).layout((2, 64), torch.bfloat16)[1][1] == torch.uint8  # int8 only
    q = quantize_ref(torch.randn(2, 64), spec)
    bf = QTensor(q.qweight, q.scales.to(torch.bfloat16), None, q.shape, spec)
    assert QTensor.from_tensors("w", bf.tensors("w")).scales.dtype == torch.bfloat16
    with pytest.raises(Exception, match="inconsistent"):  # float32 scales are in no row
        QTensor.from_tensors("w", {"w.qweight": q.qweight, "w.scales": q.scales.float()})
    assert stored_tensors("norm.weight", (5,), torch.float32) == [
        ("norm.weight", torch.float32, (5,))]


def test_memory_counts_from_the_table():
    e = memory.estimate_bytes(PixtralArgs.tiny(), QuantSpec(4, 32))
    M, K = 96, 64  # layers.0.feed_forward.w1: hidden_dim x dim
    assert e["layers.0.feed_forward.w1.qweight"] == M * K // 2
    assert e["layers.0.feed_forward.w1.scales"] == e["layers.0.feed_forward.w1.zeros"] == M * 2
