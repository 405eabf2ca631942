"""Property and fuzz tests (hypothesis): hostile bytes get a typed PixlocalError, never another
exception, a crash or a hang; valid inputs of every kind come out right.

  images     random bytes, mutated valid files of every format, valid images of every mode
             and size -> an image the prompt encoder takes, or ImageError
  shards     SafetensorsFile on a small valid file with bytes flipped, cut or inserted and
             header fields replaced -> consistent tensors or FormatError
  quantized  a quantized model dir with its index / shard metadata edited -> opens or
             FormatError; QTensor.from_tensors on random tensors -> QTensor or FormatError
  qformat    quantize/dequantize on random shapes and values incl. zeros, inf, NaN: refused
             with FormatError or reconstructed within a bound

Budget: about a minute in all by default; PIXLOCAL_FUZZ=long multiplies the examples by 20
(run with --hypothesis-show-statistics to see the counts)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from pixlocal.errors import FormatError, ImageError
from pixlocal.images import load_image
from pixlocal.qformat import SCALE_MIN, QTensor, QuantSpec, dequantize
from pixlocal.quant.quantizer import quantize
from pixlocal.shards import DTYPES, SafetensorsFile, save_file

LONG = os.environ.get("PIXLOCAL_FUZZ", "").lower() == "long"


def fuzz(examples: int):
    """hypothesis settings: `examples` in CI, 20x that with PIXLOCAL_FUZZ=long."""
    return settings(max_examples=examples * (20 if LONG else 1), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large],
                    derandomize=not LONG, database=None)


# ---- images ------------------------------------------------------------------------------------

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
# formats Pillow writes each mode to (and reads back)
FORMATS = {
    "1": ["PNG", "BMP", "TIFF", "GIF"], "L": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP"],
    "LA": ["PNG", "TIFF", "WEBP"], "P": ["PNG", "BMP", "TIFF", "GIF", "WEBP"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "AVIF"],
    "RGBA": ["PNG", "TIFF", "WEBP", "AVIF"], "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"], "I": ["TIFF"], "F": ["TIFF"],
}
LOSSLESS = {"PNG", "BMP", "TIFF"}


def _make(mode: str, w: int, h: int, seed: int, pattern: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if pattern == 0:  # noise
        base = rng.random((h, w))
    elif pattern == 1:  # flat
        base = np.full((h, w), rng.random())
    else:  # gradient
        base = (np.add.outer(np.arange(h), np.arange(w)) / max(1, h + w - 2))
    if mode == "I;16":
        return Image.fromarray((base * 65535).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((base * rng.choice([255, 65535, 2**31 - 1])).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray((base * rng.choice([1.0, 255.0, 1e6]) - rng.random()).astype(
            np.float32), "F")
    channels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    channels[..., 0] = (base * 255).astype(np.uint8)
    rgba = Image.fromarray(channels, "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(int(rng.integers(2, 256)))
    return rgba.convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def encoder(tiny_ckpt):
    from pixlocal.prompt import PromptEncoder
    return PromptEncoder(tiny_ckpt / "tekken.json", max_image_size=64)


def _encoder_takes(encoder, image: Image.Image) -> None:
    """The image goes through the real prompt encoder: finite (3, H, W) pixels."""
    enc = encoder.encode([{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "?"}]}])
    (pixels,) = enc.images
    assert pixels.ndim == 3 and pixels.shape[0] == 3 and np.isfinite(pixels).all()


def _load_or_image_error(data: bytes) -> Image.Image | None:
    try:
        image = load_image(data, max_pixels=4_000_000)
    except ImageError as e:
        assert "\n" not in str(e) and str(e).startswith("image bytes (")
        return None
    assert type(image) is Image.Image and image.size[0] * image.size[1] <= 4_000_000
    return image


@fuzz(500)
@given(st.sampled_from(MODES), st.integers(1, 300), st.integers(1, 300),
       st.integers(0, 2**32 - 1), st.integers(0, 2), st.data())
def test_valid_images_of_every_mode_and_size(encoder, mode, w, h, seed, pattern, data):
    fmt = data.draw(st.sampled_from(FORMATS[mode]), label="format")
    assume(not (fmt == "AVIF" and min(w, h) < 2))
    original = _make(mode, w, h, seed, pattern)
    image = load_image(_encode(original, fmt))
    assert type(image) is Image.Image and image.size == (w, h)
    assert image.mode in {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK"}, image.mode
    if fmt in LOSSLESS and mode in ("L", "RGB", "RGBA", "LA", "1") and image.mode == mode:
        assert np.array_equal(np.asarray(image), np.asarray(original))
    if mode == "I;16":  # 16-bit grey: rescaled to 8 bits, never clipped to white
        want = np.round(np.asarray(original, dtype=np.float64) / 257)
        assert np.abs(np.asarray(image, dtype=np.float64) - want).max() <= 1
    _encoder_takes(encoder, image)


MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
         b"RIFF\x00\x00\x00\x00WEBP", b"\x00\x00\x00\x1cftypavif", b"\x00\x00\x00\x18ftypheic",
         b"<svg", b"%PDF", b"\x00\x00\x01\x00", b"8BPS", b"P6\n"]


@fuzz(1500)
@given(st.sampled_from(MAGIC), st.binary(max_size=2048))
def test_random_bytes(magic, tail):
    _load_or_image_error(magic + tail)


@pytest.fixture(scope="module")
def valid_files() -> list[bytes]:
    files = []
    for mode, fmts in FORMATS.items():
        for fmt in fmts:
            files.append(_encode(_make(mode, 37, 23, 1, 0), fmt))
    frames = [_make("RGB", 16, 12, s, 0) for s in range(3)]
    for fmt in ("GIF", "PNG", "WEBP"):
        buffer = io.BytesIO()
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=40)
        files.append(buffer.getvalue())
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    frames[0].save(buffer, "JPEG", exif=exif)
    files.append(buffer.getvalue())
    return files


_EDIT = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("header"), st.integers(0, 63), st.integers(0, 255)),
)


def _mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, value in edits:
        if not b:
            break
        i = pos % len(b)
        if kind in ("flip", "header"):
            i = i if kind == "flip" else pos % min(len(b), 64)  # headers are where parsers trip
            b[i] ^= value or 1
        elif kind == "cut":
            del b[i:]
        else:
            b[i:i] = bytes([value]) * (1 + value % 7)
    return bytes(b)


@fuzz(2000)
@given(st.data(), st.lists(_EDIT, min_size=1, max_size=4))
def test_mutated_images(valid_files, encoder, data, edits):
    original = data.draw(st.sampled_from(valid_files), label="file")
    image = _load_or_image_error(_mutate(original, edits))
    if image is not None and image.size[0] * image.size[1] <= 10**6:
        _encoder_takes(encoder, image)


# ---- safetensors -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_safetensors(tmp_path_factory) -> bytes:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(4, 6, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
        "h": torch.randn(2, 2, generator=g).half(), "i": torch.arange(5),
        "m": torch.tensor([True, False, True]), "q": torch.randint(0, 255, (3, 5),
                                                                     dtype=torch.uint8),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5, dtype=torch.float64),
    }
    p = tmp_path_factory.mktemp("st") / "small.safetensors"
    save_file(tensors, p, {"format": "pt", "note": "fuzz"})
    return p.read_bytes()


def _check_shards(path) -> None:
    """Opens and reads consistent tensors, or raises FormatError naming the file."""
    try:
        f = SafetensorsFile(path)
    except FormatError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    raw = path.read_bytes()
    base = 8 + int.from_bytes(raw[:8], "little")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in f.metadata.items())
    for name in f.keys():
        t = f.get(name)
        lo, hi = f.entries[name]["data_offsets"]
        assert tuple(t.shape) == f.shape(name) and t.dtype == f.dtype(name)
        assert t.numel() * t.element_size() == hi - lo == math.prod(t.shape) * DTYPES[
            f.entries[name]["dtype"]][1]
        assert base + hi <= len(raw)
        if t.numel():
            assert t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() == \
                raw[base + lo: base + hi]
        f.release(name)


@fuzz(1000)
@given(st.lists(_EDIT, min_size=1, max_size=4))
def test_mutated_safetensors_bytes(tmp_path, small_safetensors, edits):
    p = tmp_path / "m.safetensors"
    p.write_bytes(_mutate(small_safetensors, edits))
    _check_shards(p)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                      children, max_size=4),
    max_leaves=8)


@fuzz(1000)
@given(st.data())
def test_safetensors_header_fields_replaced(tmp_path, small_safetensors, data):
    n = int.from_bytes(small_safetensors[:8], "little")
    header = json.loads(small_safetensors[8:8 + n])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        key = data.draw(st.sampled_from(sorted(header)), label="tensor")
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]),
                          label="field")
        value = data.draw(st.one_of(_JSON, st.sampled_from(
            ["F32", "BF16", "I64", "BOOL", "F8_E4M3", [0, 16], [8, 8], [2, 3], [0]])), label="v")
        if field is None or not isinstance(header[key], dict):
            header[key] = value
        else:
            header[key][field] = value
    body = json.dumps(header).encode()
    length = data.draw(st.sampled_from([len(body), len(body) - 1, len(body) + 8, 2**64 - 1]),
                       label="length")
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", length) + body + small_safetensors[8 + n:])
    _check_shards(p)


# ---- quantized dirs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, tiny_ckpt):
    from pixlocal.quant import quantize_checkpoint
    out = tmp_path_factory.mktemp("q") / "q4"
    quantize_checkpoint(tiny_ckpt, out, bits=4)
    return out


@fuzz(400)
@given(st.data())
def test_quantized_index_and_metadata_edits(tmp_path, quantized_dir, data):
    from pixlocal.checkpoint import QUANT_INDEX, open_checkpoint
    from pixlocal.config import read_args
    d = tmp_path / "q"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(quantized_dir, d)
    index = json.loads((d / QUANT_INDEX).read_text())
    section = data.draw(st.sampled_from(["metadata", "shards", "weight_map", None]), label="s")
    value = data.draw(st.one_of(_JSON, st.sampled_from(
        ["pixlocal", "1", "2", "int4-g32", "int8-g7", {"size": 1}, "quantized-00009-of-00004"
         ".safetensors", "../params.json"])), label="value")
    if section is None:
        index = value
    elif isinstance(index[section], dict) and index[section] and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(index[section])), label="key")
        index[section][key] = value
    else:
        index[section] = value
    (d / QUANT_INDEX).write_text(json.dumps(index))
    try:
        ckpt = open_checkpoint(d, read_args(d))
    except FormatError as e:
        assert "\n" not in str(e)
        return
    for module in ckpt.quantized():
        ckpt.qtensor(module)


_TENSOR_DTYPES = [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32]


@fuzz(600)
@given(st.sampled_from(_TENSOR_DTYPES), st.lists(st.integers(0, 70), min_size=0, max_size=3),
       st.sampled_from(_TENSOR_DTYPES), st.lists(st.integers(0, 9), min_size=0, max_size=3),
       st.one_of(st.none(), st.tuples(st.sampled_from(_TENSOR_DTYPES),
                                      st.lists(st.integers(0, 9), max_size=3))),
       st.one_of(st.none(), st.sampled_from([QuantSpec(4, 32), QuantSpec(8, 64)])))
def test_qtensor_from_random_tensors(qdt, qshape, sdt, sshape, zeros, spec):
    parts = {"w.qweight": torch.zeros(qshape, dtype=qdt), "w.scales": torch.ones(sshape, dtype=sdt)}
    if zeros is not None:
        parts["w.zeros"] = torch.zeros(zeros[1], dtype=zeros[0])
    try:
        q = QTensor.from_tensors("w", parts, spec)
    except FormatError:
        return
    d = dequantize(q)
    assert tuple(d.shape) == q.shape and torch.isfinite(d).all()


# ---- qformat round trips -----------------------------------------------------------------------

_SPECIAL = [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e-30, 1e30, 65504.0]


@fuzz(600)
@given(st.sampled_from([4, 8]), st.sampled_from([32, 64, 128]), st.booleans(),
       st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**32 - 1),
       st.sampled_from(["normal", "heavy", "sparse", "constant", "zeros"]),
       st.floats(-7, 3), st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(_SPECIAL)),
                                  max_size=3))
def test_quantize_round_trip(bits, group, search, rows, groups, seed, kind, log_scale, specials):
    spec = QuantSpec(bits, group, search=search)
    rng = np.random.default_rng(seed)
    shape = (rows, group * groups)
    w = {"normal": lambda: rng.normal(size=shape), "heavy": lambda: rng.standard_t(1.5, shape),
         "sparse": lambda: np.where(rng.random(shape) < 0.8, 0.0, rng.normal(size=shape)),
         "constant": lambda: np.full(shape, rng.normal()),
         "zeros": lambda: np.zeros(shape)}[kind]() * 10.0**log_scale
    w = torch.tensor(w, dtype=torch.float32)
    for pos, value in specials:
        w.view(-1)[pos % w.numel()] = value
    try:
        q = quantize(w, spec)
    except FormatError as e:
        msg = str(e)
        if not torch.isfinite(w).all():
            assert "NaN or inf" in msg
        else:
            assert "scale range" in msg, msg  # the only other refusal: values the scales miss
        return
    assert torch.isfinite(w).all(), "NaN/inf quantized silently"
    d = dequantize(q)
    assert d.shape == w.shape and torch.isfinite(d).all()
    wg, dg = w.view(rows, groups, group), d.view(rows, groups, group)
    err = (wg - dg).abs().amax(-1)
    assert (dg[wg.abs().amax(-1) == 0] == 0).all()  # zero groups stay exactly zero
    if bits == 4:  # asymmetric: within 1/8 of the group's span (incl. 0), or the smallest step
        span = wg.clamp(min=0).amax(-1) - wg.clamp(max=0).amin(-1)
        assert (err <= span / 8 + SCALE_MIN).all(), (err / span).max()
    else:  # symmetric: within 1/100 of the group's absmax (s/2 ~ 1/250 plus scale rounding;
        # groups below ~1e-36 have float32-subnormal scales and may come back as zeros)
        assert (err <= wg.abs().amax(-1) / 100 + 1e-35).all(), (err / wg.abs().amax(-1)).max()

