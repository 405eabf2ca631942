"""The one-call-per-layer decode kernel (kernels/cpu_decode.py) against its twin, the module
path (Block.forward with the same cpu kernels), and its fallbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixlocal import kernels

pytestmark = pytest.mark.skipif(kernels.default_backend("cpu") != "cpu",
                                reason="no cpu backend on this host")


@pytest.fixture(scope="module")
def qdir(tmp_path_factory, tiny_ckpt):
    from pixlocal.quant import quantize_checkpoint
    out = tmp_path_factory.mktemp("fused") / "q"
    quantize_checkpoint(tiny_ckpt, out, bits=4, overrides=["layers.1.*=int8-g32"])
    return out


def _run(m, enc, steps: int = 6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prefill + greedy decode steps: every step's logits, and the layers' caches after."""
    m.reset()
    out = [m.prefill(enc)]
    for _ in range(steps):
        out.append(m.decode(int(out[-1].argmax())))
    n = len(m.cache)
    return out, [c[:, :n].clone() for c in m.cache.kv.k + m.cache.kv.v]


def test_bf16_rounding_matches_torch():
    from pixlocal.kernels.cpu_decode import _rb
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-30, 30, (4000,),
                                                                          generator=g),
                   torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 0.0, -0.0,
                                 3.4e38, -3.4e38, float("inf"), 1e-40])])  # ties, extremes
    want = x.to(torch.bfloat16).float()
    got = torch.tensor([_rb(np.float32(v), True) for v in x.tolist()])
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert all(_rb(np.float32(v), False) == np.float32(v) for v in x[:50].tolist())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fused_decode_matches_the_modules(qdir, dtype):
    """Same logits and caches as Block.forward: bit for bit on this model (float32 sums and
    exp may differ in the last place on other hosts, so the check allows one bfloat16 step),
    and the same greedy tokens."""
    import pixlocal

    m = pixlocal.load(qdir, dtype=dtype)
    fd = m.fast_decode
    assert fd is not None and fd.stack is not None
    enc = m.encode([{"role": "user", "content": "Describe a lighthouse at dusk."}])
    fused, fcache = _run(m, enc)
    m.fast_decode = None
    mods, mcache = _run(m, enc)
    m.fast_decode = fd
    assert [int(t.argmax()) for t in fused] == [int(t.argmax()) for t in mods]
    tol = 2 ** -7 if dtype == "bfloat16" else 1e-5
    for a, b in zip(fused[1:], mods[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    for a, b in zip(fcache, mcache, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    # a missing rounding step would show: the modules in float32 differ far more
    if dtype == "bfloat16":
        assert sum(torch.equal(a, b) for a, b in zip(fcache, mcache, strict=True)) >= 3


def test_fused_decode_steps_aside_when_weights_change(qdir):
    """A layer re-prepared for another backend, a replaced norm weight, or a cache of another
    dtype: FastDecode answers None and the modules run (with the new weights)."""
    import pixlocal

    m = pixlocal.load(qdir, dtype="float32")
    fd = m.fast_decode
    enc = m.encode([{"role": "user", "content": "Hi"}])
    m.prefill(enc)
    pos = len(m.cache)
    cache = m.cache.ensure(pos + 1)
    h = m.model.embed(torch.tensor([5]), None)
    from pixlocal.rope import freqs_cis_1d
    f = freqs_cis_1d(torch.tensor([pos]), m.model.args.head_dim, m.model.args.rope_theta)
    assert fd(h, pos, cache) is not None
    with pytest.raises(ValueError, match="past a cache"):
        fd.stack(h, cache.capacity, cache.k, cache.v, f)  # never a write out of bounds
    assert fd(h.to(torch.float16), pos, cache) is None  # no fp16 kernel path
    blk = m.model.layers[1]
    w = blk.ffn_norm.weight  # (mapped from the file, read-only: replaced, not written)
    blk.ffn_norm.weight = torch.nn.Parameter(w * 2, requires_grad=False)
    assert fd(h, pos, cache) is None
    blk.ffn_norm.weight = w
    assert fd(h, pos, cache) is not None
    blk.feed_forward.w2.backend = "ref"
    assert fd(h, pos, cache) is None
    assert torch.isfinite(m.decode(5)).all()
