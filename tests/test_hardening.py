"""Hostile and odd inputs (issue 7): images, model files and limits. Each case asserts the exact
error kind, a one-line message naming the source, and that the refusal comes before compute.
The fuzzed versions of these live in test_fuzz.py; the long captioning run in test_soak.py."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from mistral_common.tokens.tokenizers.image import _convert_to_rgb
from PIL import Image, ImageCms

import pixlocal
from pixlocal.errors import (
    ContextOverflow,
    FormatError,
    ImageError,
    ImageTooLarge,
    PixlocalError,
)
from pixlocal.images import load_image
from pixlocal.shards import SafetensorsFile, save_file

# ---- a local HTTP server with hostile routes ---------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        path = self.path
        if path.startswith("/chain/"):  # /chain/N redirects to /chain/N-1, /chain/0 is a PNG
            n = int(path.rsplit("/", 1)[1])
            if n > 0:
                return self._reply(302, b"", Location=f"/chain/{n - 1}")
            return self._reply(200, _png(), **{"Content-Type": "image/png"})
        if path == "/loop":
            return self._reply(302, b"", Location="/loop")
        if path in ("/endless", "/chunked", "/trickle"):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            if path == "/chunked":
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(400 if path != "/trickle" else 100):
                    block = b"\x89PNG" + bytes(4092) if path != "/trickle" else b"x"
                    if path == "/chunked":
                        block = f"{len(block):x}\r\n".encode() + block + b"\r\n"
                    self.wfile.write(block)
                    self.wfile.flush()
                    if path == "/trickle":
                        time.sleep(0.05)
            except OSError:
                pass  # the client hung up: what these routes are for
            return None
        return self._reply(404, b"not here")

    def _reply(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.hits = 0
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("PIXLOCAL_MAX_PIXELS", "PIXLOCAL_MAX_IMAGE_BYTES"):
        monkeypatch.delenv(var, raising=False)


def _url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _png(image: Image.Image | None = None, fmt: str = "PNG", **save) -> bytes:
    image = image if image is not None else Image.new("RGB", (8, 6), (10, 200, 30))
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _image_error(src, *needles: str, **kw) -> str:
    with pytest.raises(ImageError) as info:
        load_image(src, **kw)
    msg = str(info.value)
    # over a size limit: ImageTooLarge (a server answers 413); any other fault: ImageError
    too_large = "too large" in msg or "too many pixels" in msg
    assert type(info.value) is (ImageTooLarge if too_large else ImageError), msg
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _rgb(image: Image.Image) -> np.ndarray:
    """What the encoder sees: mistral-common's own RGB conversion (transparency over white)."""
    return np.asarray(_convert_to_rgb(image)).astype(int)


# ---- images: limits ----------------------------------------------------------------------------


def test_a_real_decompression_bomb_is_refused_before_decoding():
    # 12000x12000 grey: 144 MB of pixels in ~140 kB of PNG.
    w = h = 12_000
    raw = zlib.compress(bytes(w + 1) * h, 9)
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    bomb += _chunk(b"IDAT", raw) + _chunk(b"IEND", b"")
    assert len(bomb) < 200_000
    start = time.monotonic()
    _image_error(bomb, "too many pixels", "12000x12000", "PIXLOCAL_MAX_PIXELS")
    assert time.monotonic() - start < 0.5  # refused from the header, nothing inflated
    assert load_image(bomb, max_pixels=w * h).size == (w, h)  # the limit is configurable


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_limits_from_the_environment(monkeypatch, tmp_path):
    png = _png(Image.new("RGB", (40, 20)))
    monkeypatch.setenv("PIXLOCAL_MAX_PIXELS", "799")
    _image_error(png, "too many pixels", "40x20", "the limit is 799")
    monkeypatch.setenv("PIXLOCAL_MAX_PIXELS", "800")
    assert load_image(png).size == (40, 20)
    assert load_image(png, max_pixels=10**6).size == (40, 20)  # an argument beats the env
    monkeypatch.setenv("PIXLOCAL_MAX_IMAGE_BYTES", "50")
    (tmp_path / "a.png").write_bytes(png)
    _image_error(tmp_path / "a.png", "a.png", "too large", "the limit is 50 bytes")
    monkeypatch.setenv("PIXLOCAL_MAX_IMAGE_BYTES", "lots")
    _image_error(png, "PIXLOCAL_MAX_IMAGE_BYTES", "not a positive whole number")


@pytest.mark.parametrize("route", ["/endless", "/chunked"])
def test_download_without_a_length_is_cut_at_the_byte_limit(server, route):
    url = _url(server, route)
    _image_error(url, url, "too large", "more than", max_bytes=100_000)


def test_a_trickling_server_is_cut_off_at_the_timeout(server):
    start = time.monotonic()
    _image_error(_url(server, "/trickle"), "/trickle", "timed out after 0.4 s", timeout=0.4)
    assert time.monotonic() - start < 1.5  # the body takes 5 s; read(64 KiB) used to wait


def test_redirects_are_bounded(server):
    assert load_image(_url(server, "/chain/3")).size == (8, 6)  # a few redirects are fine
    before = server.hits
    _image_error(_url(server, "/chain/50"), "/chain/50", "HTTP 302")
    assert server.hits - before <= 12  # urllib's bound: 10 redirects
    before = server.hits
    _image_error(_url(server, "/loop"), "/loop", "HTTP 302")
    assert server.hits - before <= 12


@pytest.mark.parametrize("url,needle", [
    ("ftp://host/a.png", "unsupported URL scheme 'ftp'"),
    ("gopher://host/a.png", "unsupported URL scheme 'gopher'"),
    ("file://otherhost/a.png", "another host"),
    ("javascript://alert(1)", "unsupported URL scheme 'javascript'"),
])
def test_only_http_https_file_and_data(url, needle):
    _image_error(url, needle)


# ---- images: modes, frames, orientation, formats -----------------------------------------------


def test_cmyk_jpeg_and_tiff_give_the_right_colours():
    rgb = Image.new("RGB", (16, 16), (200, 40, 40))
    for fmt, tol in (("JPEG", 12), ("TIFF", 3)):
        data = _png(rgb.convert("CMYK"), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        image = load_image(data)
        assert image.mode == "CMYK"
        assert np.abs(_rgb(image) - np.asarray(rgb).astype(int)).max() <= tol, fmt


def test_16_32_bit_and_float_grey_are_rescaled_not_clipped():
    ramp16 = np.linspace(0, 65535, 64).reshape(8, 8)
    cases = [
        (Image.fromarray(ramp16.astype(np.uint16)), "PNG", ramp16 / 257),
        (Image.frombytes("I;16B", (8, 8), ramp16.astype(">u2").tobytes()), "TIFF", ramp16 / 257),
        (Image.fromarray(ramp16.astype(np.int32), "I"), "TIFF", ramp16 / 257),
        (Image.fromarray((ramp16 / 65535).astype(np.float32), "F"), "TIFF", ramp16 / 257),
        (Image.fromarray((ramp16 / 257).astype(np.int32), "I"), "TIFF", np.floor(ramp16 / 257)),
        (Image.fromarray((ramp16 - 30000).astype(np.int32), "I"), "TIFF", ramp16 / 257),
    ]
    for image, fmt, want in cases:
        loaded = load_image(_png(image, fmt))
        assert loaded.mode == "L", image.mode
        got = _rgb(loaded)[..., 0]
        assert np.abs(got - want).max() <= 1.0, (image.mode, got.max(), got.min())


def test_float_grey_with_nan_and_inf_loads():
    a = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    a[0, 0], a[1, 1], a[2, 2] = np.nan, np.inf, -np.inf
    got = np.asarray(load_image(_png(Image.fromarray(a, "F"), "TIFF")))
    assert got[0, 0] == got[1, 1] == got[2, 2] == 0 and got[3, 3] == 255


def test_lab_is_converted_as_colour_not_as_channels():
    rgb = Image.new("RGB", (4, 4), (220, 30, 20))
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"),
                                     ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(rgb, to_lab)
    image = load_image(_png(lab, "TIFF"))
    assert np.abs(_rgb(image) - [220, 30, 20]).max() <= 6


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P"])
def test_transparency_reaches_the_encoder_as_white(mode):
    base = Image.new("RGBA", (6, 4), (0, 0, 255, 255))
    base.putpixel((0, 0), (0, 0, 255, 0))  # one fully transparent pixel
    src = base if mode == "RGBA" else base.convert(mode) if mode != "P" else None
    if mode == "P":
        src = Image.new("P", (6, 4), 1)
        src.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
        src.putpixel((0, 0), 0)
        src.info["transparency"] = 0
    fmt = "TIFF" if mode == "PA" else "PNG"
    rgb = _rgb(load_image(_png(src, fmt)))
    assert tuple(rgb[0, 0]) == (255, 255, 255), mode
    assert abs(int(rgb[3, 5].sum()) - (0 + 0 + 255 if mode != "LA" else 3 * 29)) <= 3, rgb[3, 5]


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_animations_and_multipage_give_the_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    extra = {"duration": 50, "loop": 0} if fmt != "TIFF" else {}
    extra.update({"lossless": True} if fmt == "WEBP" else {})
    data = _png(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = load_image(data)
    assert type(image) is Image.Image and getattr(image, "n_frames", 1) == 1
    assert np.abs(_rgb(image)[4, 4] - [250, 0, 0]).max() <= 4


# Orientation tag -> how the stored pixels must be turned to be seen upright (numpy, not PIL).
_UPRIGHT = {
    1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation(orientation, fmt):
    stored = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3
    exif = Image.Exif()
    exif[0x0112] = orientation
    save = {"lossless": True} if fmt == "WEBP" else {}
    image = load_image(_png(Image.fromarray(stored), fmt, exif=exif, **save))
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), _UPRIGHT[orientation](stored))


@pytest.mark.parametrize("data,kind", [
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "unsupported image format "
     "HEIC/HEIF"),
    (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1miafhevc" + bytes(64), "HEIC/HEIF"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(64), "AVIF"),
    (b"\xff\x0a\xfa\x7f" + bytes(60), "unsupported image format JPEG XL"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "format SVG"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(40), "format PDF"),
])
def test_unsupported_or_broken_types_are_named(tmp_path, data, kind):
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    _image_error(path, "upload.bin", kind)


def test_a_real_avif_loads():
    rgb = Image.new("RGB", (16, 16), (30, 160, 220))
    image = load_image(_png(rgb, "AVIF", quality=90))
    assert np.abs(_rgb(image)[8, 8] - [30, 160, 220]).max() <= 12


# ---- model files -------------------------------------------------------------------------------


def _write(path, header: object, data: bytes) -> None:
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(len(body).to_bytes(8, "little") + body + data)


@pytest.mark.parametrize("header,needle", [
    ({"__metadata__": ["a"], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
     "__metadata__"),
    ({"__metadata__": {"format": 3}}, "__metadata__"),
    ({"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}}, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, "bad shape"),
    ({"a": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, "bad shape"),
    ({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 0]}}, "needs"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, "bad offsets"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "bad offsets"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}}, "malformed"),
    ({"a": "F32"}, "malformed"),
    ({"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, "truncated"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_safetensors_headers_that_lie(tmp_path, header, needle):
    p = tmp_path / "w.safetensors"
    _write(p, header, bytes(16))
    with pytest.raises(FormatError) as e:
        SafetensorsFile(p)
    assert needle in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_a_header_length_beyond_the_file(tmp_path):
    p = tmp_path / "w.safetensors"
    p.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(FormatError, match="w.safetensors: header length .* truncated"):
        SafetensorsFile(p)


def test_misaligned_tensors_are_read_as_aligned_copies(tmp_path):
    p = tmp_path / "w.safetensors"
    want = np.arange(6, dtype="<f4")
    header = {"b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "a": {"dtype": "F32", "shape": [6], "data_offsets": [1, 25]}}
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    _write(p, body, b"\x07" + want.tobytes())
    a = SafetensorsFile(p).get("a")
    assert a.data_ptr() % 4 == 0
    np.testing.assert_array_equal(a.numpy(), want)


def _copy(src, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def test_a_weight_with_an_integer_dtype_is_refused(tmp_path, tiny_ckpt):
    d = _copy(tiny_ckpt, tmp_path)
    f = SafetensorsFile(d / "consolidated.safetensors")
    tensors = {k: f.get(k).clone() for k in f.keys()}
    md = dict(f.metadata)
    del f
    tensors["norm.weight"] = tensors["norm.weight"].view(torch.int32)  # same bytes, wrong dtype
    save_file(tensors, d / "consolidated.safetensors", md)
    with pytest.raises(FormatError) as e:
        pixlocal.load(d, dtype="float32")
    assert "consolidated.safetensors" in str(e.value) and "'norm.weight'" in str(e.value)
    assert "torch.int32" in str(e.value)


def test_hf_index_naming_a_missing_shard(tmp_path, tiny_args):
    from pixlocal.synthetic import write_checkpoint
    d = tmp_path / "hf"
    write_checkpoint(d, tiny_args, fmt="hf", dtype=torch.float32, seed=0)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(FormatError) as e:
        pixlocal.load(d, dtype="float32")
    assert f"missing shard {shard}" in str(e.value) and str(d) in str(e.value)


def test_a_tensor_in_two_shards_is_refused(tmp_path, tiny_ckpt):
    d = _copy(tiny_ckpt, tmp_path)
    f = SafetensorsFile(d / "consolidated.safetensors")
    save_file({"norm.weight": f.get("norm.weight").clone()}, d / "consolidated-extra.safetensors")
    with pytest.raises(FormatError, match="'norm.weight' also appears in"):
        pixlocal.load(d, dtype="float32")


def test_a_truncated_shard_fails_before_any_compute(tmp_path, tiny_ckpt, monkeypatch):
    d = _copy(tiny_ckpt, tmp_path)
    p = d / "consolidated.safetensors"
    with open(p, "r+b") as fh:
        fh.truncate(p.stat().st_size // 2)
    built = []
    import pixlocal.loader as loader
    monkeypatch.setattr(loader, "PixtralModel", lambda *a: built.append(a))
    with pytest.raises(FormatError, match="consolidated.safetensors: .*truncated"):
        pixlocal.load(d, dtype="float32")
    assert not built  # refused while opening, before the model was even built


# ---- limits ------------------------------------------------------------------------------------


def _msgs(png):
    return [{"role": "user", "content": [{"type": "image", "image": str(png)},
                                         {"type": "text", "text": "hi"}]}]


def test_kv_cache_memory_is_checked_up_front(tiny_ckpt, sample_png, monkeypatch):
    import pixlocal.generate as generate
    m = pixlocal.load(tiny_ckpt, dtype="float32")
    a = m.args
    enc = m.encode(_msgs(sample_png))
    tokens = len(enc.tokens) + 100
    need = 2 * a.n_kv_heads * a.head_dim * 4 * tokens * a.n_layers
    monkeypatch.setattr(generate, "available_ram", lambda: need - 1)
    monkeypatch.setattr(m, "_prefill", lambda *a: pytest.fail("computed despite no room"))
    with pytest.raises(ContextOverflow) as e:
        list(m.stream_encoded(enc, max_tokens=100))
    msg = str(e.value)
    assert f"KV cache for {tokens} tokens" in msg and "GiB" in msg and str(tiny_ckpt) in msg
    monkeypatch.undo()
    monkeypatch.setattr(generate, "available_ram", lambda: need)
    steps = list(m.stream_encoded(enc, max_tokens=100))
    assert 1 <= len(steps) <= 100
    monkeypatch.setattr(generate, "available_ram", lambda: 0)  # the cache is there already
    assert len(list(m.stream_encoded(enc, max_tokens=100))) == len(steps)


def test_max_tokens_bounds_in_the_library(tiny_model, sample_png):
    with pytest.raises(PixlocalError, match="max_tokens must be >= 0"):
        list(tiny_model.stream(_msgs(sample_png), max_tokens=-1))
    assert list(tiny_model.stream(_msgs(sample_png), max_tokens=0)) == []
    with pytest.raises(ContextOverflow, match="context window"):
        list(tiny_model.stream(_msgs(sample_png), max_tokens=tiny_model.args.max_seq_len))


def test_max_tokens_bounds_on_the_command_line(tmp_path, tiny_ckpt, sample_png):
    from pixlocal.cli.app import app
    from typer.testing import CliRunner
    run = CliRunner()
    for cmd in (["ask", str(sample_png), "hi"], ["caption", str(sample_png)]):
        for bad in ("0", "-5", "many"):
            r = run.invoke(app, [*cmd, "-m", str(tiny_ckpt), "--max-tokens", bad])
            assert r.exit_code == 2 and r.stdout == "", (cmd, bad, r.stderr)
    # beyond the context window: the answer stops at its end, finish reason "length"
    small = tmp_path / "small"  # the tiny model with a 40-token context
    small.mkdir()
    params = json.loads((tiny_ckpt / "params.json").read_text())
    (small / "params.json").write_text(json.dumps({**params, "max_seq_len": 40}))
    for f in ("consolidated.safetensors", "tekken.json"):
        (small / f).symlink_to(tiny_ckpt / f)
    huge = str(10**9)
    r = run.invoke(app, ["ask", str(sample_png), "hi", "-m", str(small), "--max-tokens", huge,
                         "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["finish_reason"] == "length" and d["prompt_tokens"] + len(d["tokens"]) == 40
    # caption does the same per image; a prompt that fills the context is recorded as an
    # error for that image and the run goes on: nothing is lost
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        shutil.copy(sample_png, folder / f"{i}.png")
    out = tmp_path / "caps.jsonl"
    r = run.invoke(app, ["caption", str(folder), "-o", str(out), "-m", str(small),
                         "--max-tokens", huge, "--prompt", "hi"])  # ask's prompt
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert r.exit_code == 0 and len(records) == 2, r.stderr
    assert all(rec["tokens"] == 40 - d["prompt_tokens"] for rec in records), records
    (small / "params.json").write_text(json.dumps({**params, "max_seq_len": 8}))
    r = run.invoke(app, ["caption", str(folder), "-o", str(out), "-m", str(small),
                         "--overwrite"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert r.exit_code == 1 and len(records) == 2
    assert all("context window" in rec["error"] for rec in records)


# ---- quantized dirs: version and checksums ------------------------------------------------------


@pytest.fixture(scope="module")
def q4(tmp_path_factory, tiny_ckpt):
    from pixlocal.quant import quantize_checkpoint
    out = tmp_path_factory.mktemp("q") / "q4"
    quantize_checkpoint(tiny_ckpt, out, bits=4)
    return out


def _no_model_built(monkeypatch) -> list:
    import pixlocal.loader as loader
    built: list = []
    monkeypatch.setattr(loader, "PixtralModel", lambda *a: built.append(a))
    return built


@pytest.mark.parametrize("where", ["index", "shard"])
def test_unknown_format_version_is_refused_before_compute(q4, tmp_path, monkeypatch, where):
    from pixlocal.checkpoint import QUANT_INDEX
    d = _copy(q4, tmp_path)
    index = json.loads((d / QUANT_INDEX).read_text())
    shard = d / sorted(index["shards"])[0]
    if where == "index":
        index["metadata"]["format_version"] = "7"
        named = QUANT_INDEX
    else:
        f = SafetensorsFile(shard)
        tensors, md = {k: f.get(k).clone() for k in f.keys()}, {**f.metadata}
        del f
        save_file(tensors, shard, {**md, "format_version": "7"})
        index["shards"][shard.name]["size"] = shard.stat().st_size
        named = shard.name
    (d / QUANT_INDEX).write_text(json.dumps(index))
    built = _no_model_built(monkeypatch)
    with pytest.raises(FormatError) as e:
        pixlocal.load(d, dtype="float32")
    assert "format_version 7" in str(e.value) and named in str(e.value) and not built


def test_a_wrong_checksum_is_found_by_verify(q4, tmp_path):
    from pixlocal.quant import verify_dir

    from pixlocal.checkpoint import QUANT_INDEX
    d = _copy(q4, tmp_path)
    index = json.loads((d / QUANT_INDEX).read_text())
    shard = d / sorted(index["shards"])[-1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10  # tensor data, size unchanged: only a hash can tell
    shard.write_bytes(bytes(raw))
    with pytest.raises(FormatError) as e:
        verify_dir(d)
    assert shard.name in str(e.value) and "sha256" in str(e.value)
    with pytest.raises(FormatError) as e:  # the first load hashes too (tests/test_integrity.py)
        pixlocal.load(d, dtype="float32")
    assert shard.name in str(e.value) and "pixlocal verify" in str(e.value)
