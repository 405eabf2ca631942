"""Model math on the tiny checkpoint: KV-cache self-consistency, per-image attention, shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixlocal.model import KVCache
from pixlocal.rope import apply_rotary_emb, freqs_cis_2d
from tests.tolerances import BLOCK_DIAGONAL_ATOL, KV_CONSISTENCY_ATOL


def _prompt(model, *images):
    content = [{"type": "image", "image": str(p)} for p in images]
    content.append({"type": "text", "text": "Describe these pictures, please."})
    return model.encode([{"role": "user", "content": content}])


def test_logits_shape_and_dtype(tiny_model, sample_png):
    enc = _prompt(tiny_model, sample_png)
    out = tiny_model.logits(enc.tokens, enc.images)
    assert out.shape == (len(enc.tokens), tiny_model.args.vocab_size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.std() > 0.1  # random weights still give varied logits


@pytest.mark.parametrize("splits", [[7], [1, 5, 3], [30, 2]])
def test_prefill_plus_decode_equals_full_forward(tiny_model, sample_png, other_png, splits):
    m = tiny_model
    enc = _prompt(m, sample_png, other_png)
    full = m.logits(enc.tokens, enc.images)
    with torch.inference_mode():
        h = m.model.embed(torch.tensor(enc.tokens), m.image_features(enc.images).float())
        a = m.args
        cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, 8, torch.float32)
        cache.grow(len(enc.tokens))  # growth must keep nothing stale
        outs, pos = [], 0
        for n in splits:  # a few chunked prefills, then one token at a time
            outs.append(m.model(h[pos:pos + n], pos, cache))
            pos += n
        while pos < len(enc.tokens):
            outs.append(m.model(h[pos:pos + 1], pos, cache))
            pos += 1
    torch.testing.assert_close(torch.cat(outs), full, atol=KV_CONSISTENCY_ATOL, rtol=0)


def test_per_image_attention_equals_block_diagonal_mask(tiny_model):
    """The encoder's per-image loop is the block-diagonal mask of SPEC §3.5, built here."""
    enc = tiny_model.model.vision_encoder
    att = enc.transformer.layers[0].attention
    torch.manual_seed(0)
    grids = [(3, 5), (1, 2), (4, 1)]
    n = [r * c for r, c in grids]
    x = torch.randn(sum(n), enc.args.hidden_size)
    f = torch.cat([freqs_cis_2d(r, c, enc.args.head_dim, enc.args.rope_theta) for r, c in grids])
    with torch.inference_mode():
        ours = att(x, f, n)
        H, Dh = att.n_heads, att.head_dim
        q = apply_rotary_emb(att.wq(x).view(-1, H, Dh), f).transpose(0, 1)
        k = apply_rotary_emb(att.wk(x).view(-1, H, Dh), f).transpose(0, 1)
        v = att.wv(x).view(-1, H, Dh).transpose(0, 1)
        mask = torch.block_diag(*[torch.ones(k_, k_, dtype=torch.bool) for k_ in n])
        ref = att.wo(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                     .transpose(0, 1).reshape(sum(n), -1))
    torch.testing.assert_close(ours, ref, atol=BLOCK_DIAGONAL_ATOL, rtol=0)


def test_images_are_independent(tiny_model, sample_png, other_png):
    """An image's features do not depend on the other images of the prompt."""
    a = _prompt(tiny_model, sample_png)
    both = _prompt(tiny_model, sample_png, other_png)
    fa = tiny_model.image_features(a.images)
    fb = tiny_model.image_features(both.images)[: fa.shape[0]]
    torch.testing.assert_close(fa, fb, atol=BLOCK_DIAGONAL_ATOL, rtol=0)


def test_2d_rope_frequencies_match_spec():
    """SPEC §3.4: the first values of the height and width frequencies."""
    f = freqs_cis_2d(2, 2, 64, 10000.0)  # patch (1, 1) is row 3 in row-major order
    angles = torch.angle(f[3])
    np.testing.assert_allclose(angles[:4].numpy(), [1, 0.5623, 0.3162, 0.1778], atol=1e-4)
    np.testing.assert_allclose(angles[16:20].numpy(), [0.7499, 0.4217, 0.2371, 0.1334],
                               atol=1e-4)
    assert torch.all(torch.angle(f[1])[:16] == 0)  # patch (0, 1): row angle 0


def test_bfloat16_model_runs(tiny_ckpt, sample_png):
    import pixlocal
    m = pixlocal.load(tiny_ckpt, dtype="bfloat16")
    assert m.dtype == torch.bfloat16
    enc = _prompt(m, sample_png)
    out = m.logits(enc.tokens, enc.images)
    ref = pixlocal.load(tiny_ckpt, dtype="float32").logits(enc.tokens, enc.images)
    assert out.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the logits follow the fp32 ones closely, not exactly
    assert torch.corrcoef(torch.stack([out.flatten(), ref.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize("backend", ["ref", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [1, 7, 300, 2100])  # 2100: threaded (PARALLEL_MIN)
def test_cpu_decode_attention_equals_sdpa(backend, dtype, S):
    """The CPU decode paths (ref: grouped float32 bmm's, not torch's slow GQA SDPA; cpu:
    numba, serial and threaded) compute softmax(q k^T / sqrt(Dh)) v over the first S cached
    positions, query head h reading KV head h // (H / Hkv)."""
    from pixlocal import kernels

    if backend == "cpu" and kernels.default_backend("cpu") != "cpu":
        pytest.skip("no cpu backend on this host")
    g = torch.Generator().manual_seed(S)
    q = torch.randn(8, 1, 128, generator=g).to(dtype)
    ck, cv = (torch.randn(2, S + 5, 128, generator=g).to(dtype) for _ in range(2))  # + unused
    k, v = ck[:, :S], cv[:, :S]
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    got = kernels.backend_module(backend).decode_attention(q, ck, cv, S)
    assert got.dtype == dtype and got.shape == (8, 1, 128)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's own rounding
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_and_vision_attention_take_torch_fused_kernel(tiny_ckpt, sample_png, dtype):
    """torch's SDPA runs its fused (flash) CPU kernel only for 4-D inputs; 3-D ones fell to the
    math path (3.5x slower at 1064 tokens). Full causal prefill, the masked prefill after a
    cached prefix and the vision encoder all must take the fused kernel."""
    from torch.profiler import profile

    import pixlocal
    m = pixlocal.load(tiny_ckpt, dtype=dtype)
    enc = _prompt(m, sample_png)
    with profile() as prof, torch.inference_mode():
        h = m.model.embed(torch.tensor(enc.tokens), m.image_features(enc.images).to(m.dtype))
        a = m.args
        cache = KVCache(a.n_layers, a.n_kv_heads, a.head_dim, len(enc.tokens), m.dtype)
        m.model(h[:9], 0, cache)  # S == L: is_causal
        m.model(h[9:], 9, cache)  # after a cached prefix: boolean mask
    names = [e.name for e in prof.events()]
    fused = [n for n in names if n.startswith("aten::_scaled_dot_product_flash_attention")]
    assert "aten::_scaled_dot_product_attention_math" not in names
    assert len(fused) == a.vision_encoder.num_hidden_layers + 2 * a.n_layers
