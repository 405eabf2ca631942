"""A device string torch rejects is one PixlocalError line from the library too (the CLI
checks --device first; Python callers get the same kind of message)."""

from __future__ import annotations

import pytest

from pixlocal.errors import PixlocalError
from pixlocal.kernels.backend import parse_device


@pytest.mark.parametrize("bad", ["CPU", "tpu", "cuda:x", "meta", ""])
def test_bad_device_is_one_line(bad):
    with pytest.raises(PixlocalError) as e:
        parse_device(bad)
    assert "\n" not in str(e.value) and "cpu" in str(e.value)


def test_good_devices():
    assert parse_device("auto").type in ("cpu", "cuda")
    assert parse_device("cpu").type == "cpu"


def test_synchronize_waits_for_each_gpu_once_and_never_for_the_cpu(monkeypatch):
    """Timings (bench, the runner's Steps) read the clock after the queued GPU work: each
    CUDA device among the plan's is synchronized once; a CPU-only plan costs nothing."""
    import torch

    from pixlocal.kernels import backend
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: waited.append(d))
    backend.synchronize([torch.device("cpu"), "cuda:0", torch.device("cuda:0"), "cuda:1"])
    assert sorted(map(str, waited)) == ["cuda:0", "cuda:1"]
    waited.clear()
    backend.synchronize([torch.device("cpu")] * 3)
    assert waited == []
