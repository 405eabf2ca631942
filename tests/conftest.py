"""Shared fixtures: tiny random checkpoints written to disk in the real formats, with the
real Pixtral tokenizer, loaded through the same path as real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pixlocal.config import PixtralArgs

torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _isolate(request, tmp_path, monkeypatch):
    """Never touch the user's model home or registry from a test. Tests not marked `gpu` run
    on the CPU on a GPU host too: device "auto" finds no CUDA device, in this process and in
    the commands it starts (they assert CPU facts: threads, memory maps, CPU kernels)."""
    monkeypatch.setenv("PIXLOCAL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PIXLOCAL_MODEL", raising=False)
    monkeypatch.delenv("PIXLOCAL_MODELS_TOML", raising=False)
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def tiny_args() -> PixtralArgs:
    return PixtralArgs.tiny()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_args):
    """Mistral format, float32, seed 0."""
    from pixlocal.synthetic import write_checkpoint
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_checkpoint(d, tiny_args, fmt="mistral", dtype=torch.float32, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    import pixlocal
    return pixlocal.load(tiny_ckpt, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def sample_png(tmp_path_factory):
    """A 64×48 RGB gradient (4×3 patches)."""
    y, x = np.mgrid[0:48, 0:64]
    arr = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    p = tmp_path_factory.mktemp("img") / "sample.png"
    Image.fromarray(arr).save(p)
    return p


@pytest.fixture(scope="session")
def other_png(tmp_path_factory):
    """A different picture with the same size as sample_png (same [IMG] ids)."""
    rng = np.random.default_rng(1)
    p = tmp_path_factory.mktemp("img") / "other.png"
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(p)
    return p
