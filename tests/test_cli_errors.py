"""Bad input to `pixlocal ask` and to the API: one line naming the thing, exit 1, typed errors."""

from __future__ import annotations

import socket

import pytest
from pixlocal.cli.app import app
from typer.testing import CliRunner

import pixlocal
from pixlocal.errors import ConfigError, ImageError, ModelNotFound, PixlocalError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(*args: str):
    return CliRunner().invoke(app, ["ask", *args])


def _one_line(r, *needles: str) -> None:
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_missing_model_dir(tmp_path, sample_png):
    _one_line(_ask(str(sample_png), "hi", "-m", str(tmp_path / "nope")), "nope", "not found")
    with pytest.raises(ModelNotFound):
        pixlocal.load(tmp_path / "nope")


def test_dir_without_params(tmp_path, sample_png):
    (tmp_path / "empty").mkdir()
    _one_line(_ask(str(sample_png), "hi", "-m", str(tmp_path / "empty")), "empty",
              "params.json")
    with pytest.raises(ConfigError):
        pixlocal.load(tmp_path / "empty")


@pytest.mark.parametrize("kind", ["missing", "text", "zero", "svg"])
def test_unreadable_or_unsupported_image(tmp_path, tiny_ckpt, kind):
    p = tmp_path / ("x.svg" if kind == "svg" else "x.png")
    if kind == "text":
        p.write_text("not an image\n")
    elif kind == "zero":
        p.write_bytes(b"")
    elif kind == "svg":
        p.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    _one_line(_ask(str(p), "hi", "-m", str(tiny_ckpt)), p.name)


def test_failing_url(tiny_ckpt, tiny_model):
    url = f"http://127.0.0.1:{_free_port()}/cat.png"
    _one_line(_ask(url, "hi", "-m", str(tiny_ckpt)), url)
    msgs = [{"role": "user", "content": [{"type": "image", "image": url},
                                         {"type": "text", "text": "hi"}]}]
    with pytest.raises(ImageError) as e:
        tiny_model.encode(msgs)
    assert url in str(e.value) and isinstance(e.value, PixlocalError)


def test_cuda_without_cuda_is_one_line(tiny_ckpt, sample_png):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _one_line(_ask(str(sample_png), "hi", "-m", str(tiny_ckpt), "--device", "cuda"), "cuda")
