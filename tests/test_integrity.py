"""Corrupt models are noticed: shard checksums on the first load (then remembered), and
NaN/inf logits stop generation with one line that names the cause and `pixlocal verify`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pixlocal
from pixlocal import integrity
from pixlocal.checkpoint import QUANT_INDEX
from pixlocal.errors import FormatError, NonFiniteLogits


@pytest.fixture(scope="module")
def q4(tmp_path_factory, tiny_ckpt):
    from pixlocal.quant import quantize_checkpoint
    out = tmp_path_factory.mktemp("q") / "q4"
    quantize_checkpoint(tiny_ckpt, out, bits=4)
    return out


def _largest_shard(d):
    index = json.loads((d / QUANT_INDEX).read_text())
    return max((d / n for n in index["shards"]), key=lambda p: p.stat().st_size)


def test_first_load_hashes_then_remembers(q4, tmp_path, monkeypatch):
    d = tmp_path / "m"
    shutil.copytree(q4, d)
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p, t=None: calls.append(p) or real(p, t))
    pixlocal.load(d, dtype="float32")
    shards = json.loads((d / QUANT_INDEX).read_text())["shards"]
    assert len(calls) == len(shards)
    pixlocal.load(d, dtype="float32")  # same sizes and mtimes: no hashing
    assert len(calls) == len(shards)
    assert integrity.unverified(d, shards) == []
    os.utime(_largest_shard(d))  # touched: that shard alone is hashed again
    pixlocal.load(d, dtype="float32")
    assert len(calls) == len(shards) + 1


def test_a_megabyte_of_flipped_bytes_is_refused_at_load(q4, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(q4, d)
    pixlocal.load(d, dtype="float32")  # verified and remembered
    shard = _largest_shard(d)
    raw = bytearray(shard.read_bytes())
    n = min(1 << 20, len(raw) // 2)
    start = len(raw) - n  # tensor data: the header stays valid, the size unchanged
    raw[start:] = bytes(b ^ 0xFF for b in raw[start:])
    shard.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as e:
        pixlocal.load(d, dtype="float32")
    msg = str(e.value)
    assert shard.name in msg and "corrupt" in msg and "pixlocal verify" in msg
    assert "\n" not in msg


def test_verification_can_be_skipped(q4, tmp_path, monkeypatch):
    d = tmp_path / "m"
    shutil.copytree(q4, d)
    monkeypatch.setenv("PIXLOCAL_VERIFY", "0")
    monkeypatch.setattr(integrity, "sha256_file", lambda *a: pytest.fail("hashed"))
    pixlocal.load(d, dtype="float32")


def test_sample_refuses_non_finite_logits():
    from pixlocal.generate import sample
    logits = torch.zeros(10)
    logits[3] = float("nan")
    with pytest.raises(NonFiniteLogits, match="pixlocal verify"):
        sample(logits, 0.0, 1.0, 0, None)
    with pytest.raises(NonFiniteLogits):
        sample(logits, 0.8, 0.9, 0, torch.Generator().manual_seed(0))
    logits[3] = float("inf")
    with pytest.raises(NonFiniteLogits):
        sample(logits, 0.0, 1.0, 0, None)
    logits[3] = -float("inf")  # a banned token is fine
    assert sample(logits, 0.0, 1.0, 0, None) == 0
    assert 0 <= sample(logits, 1.0, 1.0, 0, torch.Generator().manual_seed(0)) < 10


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_nan_weights_stop_ask_with_one_line(tmp_path, tiny_args, temperature):
    from safetensors.numpy import load_file, save_file

    from pixlocal.synthetic import write_checkpoint
    d = tmp_path / "nan"
    write_checkpoint(d, tiny_args, fmt="mistral", dtype=torch.float32, seed=0)
    f = d / "consolidated.safetensors"
    t = load_file(f)
    name = next(k for k in t if k.endswith("attention.wq.weight"))
    t[name] = np.full_like(t[name], np.nan)
    save_file(t, f)
    r = subprocess.run([sys.executable, "-m", "pixlocal.cli.app", "ask", "-m", str(d),
                        "--temperature", temperature, "--max-tokens", "4", "Say hi."],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PIXLOCAL_HOME": str(tmp_path / "home")})
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "NaN" in lines[0] and "pixlocal verify" in lines[0]
