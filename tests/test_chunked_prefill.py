"""Chunked prefill: a prompt runs through the decoder at most `prefill_chunk` tokens per call
(what the plan reserves activations for) and the vision encoder takes one image at a time.
The logits equal an unchunked prefill's, and a 16k-token prompt's peak memory stays within the
activation reserve (measured: the process's resident high-water mark)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from pixlocal.config import PixtralArgs
from pixlocal.memory import activation_bytes, prefill_chunk
from pixlocal.synthetic import write_checkpoint


@pytest.fixture
def two_images(tiny_model, sample_png, other_png):
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image", "image": str(sample_png)},
        {"type": "text", "text": "with"}, {"type": "image", "image": str(other_png)},
        {"type": "text", "text": "in one word."}]}]
    return tiny_model.encode(msgs)


def _img_spans(tokens: list[int], img_ids: set[int]) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, t in enumerate([*tokens, -1]):
        if t in img_ids and start is None:
            start = i
        elif t not in img_ids and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_chunked_prefill_equals_unchunked(tiny_model, two_images, monkeypatch):
    m, enc = tiny_model, two_images
    e = m.encoder
    ids = {e.img_id, e.img_break_id}
    spans = _img_spans(enc.tokens, ids)
    assert len(spans) == 2
    calls: list[int] = []
    encoder = m.model.vision_encoder
    real = encoder.forward
    monkeypatch.setattr(encoder, "forward", lambda imgs: calls.append(len(imgs)) or real(imgs))

    m.reset()
    monkeypatch.setattr(m, "prefill_chunk", 10**6)
    ref = m.prefill(enc)
    ref_all = m.logits(enc.tokens, enc.images)
    crossed = 0
    for chunk in (1, 5, 7, 16, 64):
        crossed += any(a // chunk != (b - 1) // chunk for a, b in spans)
        m.reset()
        monkeypatch.setattr(m, "prefill_chunk", chunk)
        got = m.prefill(enc)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.logits(enc.tokens, enc.images), ref_all,
                                   atol=1e-4, rtol=1e-4)
        assert int(got.argmax()) == int(ref.argmax())
    assert crossed >= 3  # chunk boundaries inside image blocks
    assert calls and set(calls) == {1}, calls  # the vision encoder: one image per call


def test_chunked_prefill_after_cached_prefix(tiny_model, two_images, monkeypatch):
    """A second request sharing the prefix runs its new tokens in chunks from where the cache
    ends; its logits equal a cold unchunked prefill's."""
    m, enc = tiny_model, two_images
    m.reset()
    monkeypatch.setattr(m, "prefill_chunk", 10**6)
    ref = m.prefill(enc)
    m.reset()
    monkeypatch.setattr(m, "prefill_chunk", 9)
    first = _img_spans(enc.tokens, {m.encoder.img_id, m.encoder.img_break_id})[0]
    m.prefill(dataclasses.replace(enc, tokens=enc.tokens[: first[1] + 2], images=enc.images[:1]))
    encoded = m.images_encoded
    torch.testing.assert_close(m.prefill(enc), ref, atol=1e-4, rtol=1e-4)
    assert m.images_encoded == encoded + 1  # the first image came from the cache


def test_prefill_chunk_is_the_planned_activation_length(tiny_model):
    assert tiny_model.prefill_chunk == prefill_chunk(tiny_model.plan.context_len,
                                                     tiny_model.plan.image_patches)
    assert prefill_chunk(32768, 4096) == 4096 + 64 + 512
    assert prefill_chunk(100, 4096) == 100


PEAK = textwrap.dedent("""
    import json, sys, torch, pixlocal
    from pixlocal.prompt import Encoded

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    m = pixlocal.load(sys.argv[1], dtype="float32", context_len=int(sys.argv[2]), threads=1)
    n = int(sys.argv[3])
    gen = torch.Generator().manual_seed(0)
    tokens = [1] + torch.randint(1000, 100000, (n - 1,), generator=gen).tolist()
    m.prefill(Encoded(tokens[:600], []))  # kernels, threads and the KV cache (full size) set up
    m.cache.ensure(n)
    m.reset()
    if len(sys.argv) > 4:
        m.prefill_chunk = int(sys.argv[4])
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark restarts from here
    base = status("VmRSS")
    m.prefill(Encoded(tokens, []))
    print(json.dumps({"peak": status("VmHWM") - base, "chunk": m.prefill_chunk}))
""")


def test_long_prompt_peak_memory_within_plan(tmp_path):
    """A 16k-token prompt on the CPU: the resident peak above the loaded model and its KV cache
    stays within the decoder's planned activation reserve (unchunked, the per-token
    intermediates of all 16k tokens at once are ~2.5x that)."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        pytest.skip("this kernel cannot reset the resident high-water mark")
    base = PixtralArgs.tiny()
    args = dataclasses.replace(
        base, dim=256, hidden_dim=1024, n_heads=4, n_kv_heads=2, head_dim=64, max_seq_len=20000,
        vision_encoder=dataclasses.replace(base.vision_encoder, image_size=256))
    ckpt = write_checkpoint(tmp_path / "m", args, dtype=torch.float32)
    n, ctx = 16384, 16640
    out = subprocess.run([sys.executable, "-c", PEAK, str(ckpt), str(ctx), str(n)],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    patches = (256 // 16) ** 2
    assert got["chunk"] == prefill_chunk(ctx, patches) < n
    _, reserve = activation_bytes(args, ctx, patches, itemsize=4)
    assert got["peak"] <= reserve, (got, reserve)
