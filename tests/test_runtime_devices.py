"""The runtime's GPU promises that can be shown on the CPU: timings wait for the device, the
KV cache of GPU layers takes its planned size at once, and logits() of a long prompt builds
its (L, V) rows one chunk at a time. `is_gpu` is patched to say "GPU" for the CPU layers and
torch.cuda.synchronize stands in for the device queue."""

from __future__ import annotations

import time

import pytest
import torch

import pixlocal
from pixlocal import promptcache
from pixlocal.kernels import backend


@pytest.fixture
def fresh(tiny_ckpt):
    return pixlocal.load(tiny_ckpt, dtype="float32", device="cpu")


def test_prefill_time_waits_for_the_device(fresh, monkeypatch):
    """GPU kernels run asynchronously: the clock is read after the queued work ends."""
    synced: list[float] = []

    def synchronize(device=None):
        time.sleep(0.25)  # the queued prefill kernels finishing
        synced.append(time.perf_counter())

    monkeypatch.setattr(backend, "is_gpu", lambda d: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    steps = list(fresh.stream([{"role": "user", "content": "hi"}], max_tokens=2))
    assert synced
    assert steps[0].prefill_s >= 0.25
    assert steps[-1].elapsed_s >= steps[0].prefill_s


def test_gpu_kv_cache_takes_its_planned_size(fresh, monkeypatch):
    """Growing a GPU cache by doubling would hold old and new buffers at once (unplanned)."""
    monkeypatch.setattr(promptcache, "is_gpu", lambda d: True)
    fresh.generate([{"role": "user", "content": "hi"}], max_tokens=3)
    assert fresh.cache.kv is not None
    assert fresh.cache.kv.capacity == fresh.context_limit


def test_cpu_kv_cache_grows_on_demand(fresh):
    fresh.generate([{"role": "user", "content": "hi"}], max_tokens=3)
    assert fresh.cache.kv is not None
    assert fresh.cache.kv.capacity < fresh.context_limit


def test_logits_heads_one_chunk_at_a_time(fresh, monkeypatch):
    """logits(): the head sees at most prefill_chunk rows per call and every row lands in
    one float32 (L, V) tensor on the CPU (not (L, V) in the compute dtype plus its copies)."""
    rows: list[int] = []
    head = fresh.model.head
    monkeypatch.setattr(fresh.model, "head", lambda h: rows.append(h.shape[0]) or head(h))
    tokens = fresh.encode([{"role": "user", "content": "one two three four five six"}]).tokens
    full = fresh.logits(tokens, [])
    monkeypatch.setattr(fresh, "prefill_chunk", 4)
    rows.clear()
    chunked = fresh.logits(tokens, [])
    assert max(rows) <= 4 and sum(rows) == len(tokens)
    assert chunked.dtype == torch.float32 and chunked.device.type == "cpu"
    torch.testing.assert_close(chunked, full, atol=1e-4, rtol=1e-4)
