"""Fixtures for the CLI tests: a models.toml pointing at the tiny checkpoint, broken images."""

from __future__ import annotations

import numpy as np
import pytest
from hub_server import Hub
from PIL import Image


def write_registry(path, tiny_ckpt) -> None:
    path.write_text(f"""default = "tiny"

[models.tiny]
aliases = ["t"]
description = "tiny random Pixtral"
variants.f32 = {{ path = "{tiny_ckpt}" }}
default_variant = "f32"

[models.big]
aliases = ["b"]
upstream = "acme/big"
files = ["params.json", "consolidated.safetensors", "tekken.json"]
variants.bf16 = {{ path = "${{PIXLOCAL_HOME}}/big" }}
variants.int4 = {{ path = "${{PIXLOCAL_HOME}}/big-int4", quant = "int4" }}
default_variant = "int4"
""")


@pytest.fixture
def tiny_registry(tmp_path, tiny_ckpt, monkeypatch):
    """PIXLOCAL_MODELS_TOML -> a registry whose default `tiny` is the tiny checkpoint."""
    p = tmp_path / "models.toml"
    write_registry(p, tiny_ckpt)
    monkeypatch.setenv("PIXLOCAL_MODELS_TOML", str(p))
    return p


def make_image_folder(root, n_good: int = 3):
    """n_good valid images (one in a subfolder) and the four kinds of broken ones.
    Returns (good paths, bad paths)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    good = []
    for i in range(n_good):
        p = root / ("sub" if i == 0 else ".") / f"good{i:02d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(rng.integers(0, 255, (32 + 8 * (i % 3), 48, 3), dtype=np.uint8)).save(p)
        good.append(p.resolve())
    jpg = root / "sub" / "good00.png"
    Image.open(jpg).convert("RGB").save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    bad = {
        "truncated": root / "truncated.jpg",
        "zero": root / "zero.png",
        "text": root / "notes.png",
        "unsupported": root / "photo.heic",
    }
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is a text file, not a picture\n")
    bad["unsupported"].write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    return good, {k: v.resolve() for k, v in bad.items()}


FILES = ("params.json", "consolidated.safetensors", "tekken.json")  # acme/big's files


@pytest.fixture
def hub(tiny_ckpt):
    h = Hub(repos={"acme/big": {f: (tiny_ckpt / f).read_bytes() for f in FILES}})
    h.endpoint = h.start()
    yield h
    h.stop()
