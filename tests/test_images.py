"""pixlocal.images.load_image: every kind of source, and one-line ImageErrors naming the source.
No network: URLs point at a local http.server on 127.0.0.1."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from pixlocal.errors import ImageError
from pixlocal.images import load_image

MAX_REQUESTS = 100  # the test server stops after this many, so a runaway loop cannot hang pytest


def _picture(size=(40, 20), mode="RGB") -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 6 % 256, y * 11 % 256, (x + y) * 3 % 256], -1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def _encode(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


PNG = _encode(_picture())
JPEG = _encode(_picture((64, 64)), "JPEG", quality=90)
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
ROUTES: dict[str, tuple[int, dict[str, str], bytes]] = {
    "/img.png": (200, {"Content-Type": "image/png"}, PNG),
    "/photo.jpg?size=large": (200, {"Content-Type": "image/jpeg"}, JPEG),
    "/moved": (302, {"Location": "/img.png"}, b""),
    "/to-ftp": (302, {"Location": "ftp://127.0.0.1/img.png"}, b""),
    "/page": (200, {"Content-Type": "text/html"}, b"<!DOCTYPE html><html>Sign in</html>"),
    "/big.png": (200, {"Content-Type": "image/png"}, PNG + bytes(100_000)),
    "/error": (500, {}, b"oops"),
}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits += 1  # type: ignore[attr-defined]
        if self.path == "/slow.png":
            time.sleep(1.5)
        status, headers, body = ROUTES.get(self.path, (404, {}, b"not here"))
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # clients that hang up early (timeout and size tests) are expected here


@pytest.fixture(scope="module")
def server():
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.timeout = 0.05  # handle_request() returns after this even when nobody calls
    httpd.hits = 0
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set() and httpd.hits < MAX_REQUESTS:
            httpd.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stop.set()
    thread.join(timeout=5)
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """A proxy from the environment must not intercept requests to the local server."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _same_pixels(a: Image.Image, b: Image.Image) -> None:
    assert a.size == b.size and a.mode == b.mode
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _error(src, *expected: str, **kw) -> str:
    with pytest.raises(ImageError) as info:
        load_image(src, **kw)
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part in message, message
    return message


# --- sources -----------------------------------------------------------------------------------


def test_local_path_as_str_pathlib_and_file_uri(tmp_path):
    path = tmp_path / "pic one.png"
    path.write_bytes(PNG)
    for src in (str(path), path, path.as_uri()):
        image = load_image(src)
        _same_pixels(image, Image.open(path))


def test_pil_image_is_returned_as_is():
    image = _picture()
    assert load_image(image) is image


def test_bytes_and_data_uris():
    _same_pixels(load_image(PNG), Image.open(io.BytesIO(PNG)))
    _same_pixels(load_image(bytearray(JPEG)), Image.open(io.BytesIO(JPEG)))
    b64 = base64.b64encode(PNG).decode()
    _same_pixels(load_image(f"data:image/png;base64,{b64}"), Image.open(io.BytesIO(PNG)))
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))  # MIME line breaks
    _same_pixels(load_image(f"data:image/png;base64,{wrapped}"), Image.open(io.BytesIO(PNG)))


def test_url_and_redirect(server):
    _same_pixels(load_image(f"{server}/img.png"), Image.open(io.BytesIO(PNG)))
    _same_pixels(load_image(f"{server}/moved"), Image.open(io.BytesIO(PNG)))
    _same_pixels(load_image(f"{server}/photo.jpg?size=large"), Image.open(io.BytesIO(JPEG)))


def test_image_is_fully_decoded_and_detached():
    image = load_image(PNG)
    assert type(image) is Image.Image  # not a lazy ImageFile still holding the source
    assert image.getpixel((0, 0)) is not None


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    gif = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    image = load_image(gif)
    assert image.convert("RGB").getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    stored = _picture((40, 20))
    image = load_image(_encode(stored, "JPEG", exif=exif, quality=95))
    assert image.size == (20, 40)
    assert image.getexif().get(0x0112, 1) == 1


def test_16bit_grey_is_rescaled_not_clipped():
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    image = load_image(_encode(Image.fromarray(ramp)))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image), np.round(ramp / 257).astype(np.uint8))


def test_rgba_palette_and_grey_keep_their_mode_and_transparency():
    # Transparency is composited onto white later by mistral-common; it must survive loading.
    palette = _picture().quantize(16)
    palette.info["transparency"] = 3  # saved as a PNG tRNS chunk
    for image in (_picture(mode="RGBA"), _picture(mode="LA"), _picture(mode="L"), palette):
        encoded = _encode(image)
        loaded = load_image(encoded)
        assert loaded.mode == image.mode
        _same_pixels(loaded.convert("RGBA"), Image.open(io.BytesIO(encoded)).convert("RGBA"))


# --- failures ----------------------------------------------------------------------------------


def test_missing_zero_byte_and_text_files(tmp_path):
    _error(str(tmp_path / "nope.png"), "nope.png", "not found")
    (tmp_path / "empty.png").write_bytes(b"")
    _error(tmp_path / "empty.png", "empty.png", "empty")
    (tmp_path / "notes.png").write_text("shopping list:\n- milk\n")
    _error(tmp_path / "notes.png", "notes.png", "not an image", "text")
    _error(str(tmp_path), str(tmp_path), "directory")
    _error("", "empty")


def test_truncated_jpeg_and_png(tmp_path):
    (tmp_path / "half.jpg").write_bytes(JPEG[: len(JPEG) // 2])
    _error(tmp_path / "half.jpg", "half.jpg", "truncated JPEG")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    big_png = _encode(Image.fromarray(noise))
    (tmp_path / "half.png").write_bytes(big_png[: len(big_png) // 2])
    _error(tmp_path / "half.png", "half.png", "truncated PNG")
    (tmp_path / "header.png").write_bytes(PNG[:20])
    _error(tmp_path / "header.png", "header.png", "PNG")


def test_unsupported_formats_are_named(tmp_path):
    (tmp_path / "IMG_0001.HEIC").write_bytes(HEIC)
    _error(tmp_path / "IMG_0001.HEIC", "IMG_0001.HEIC", "HEIC")
    (tmp_path / "logo.svg").write_text(
        '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>'
    )
    _error(tmp_path / "logo.svg", "logo.svg", "SVG")
    _error("data:image/svg+xml,%3Csvg%20xmlns%3D%22x%22%2F%3E", "data URI image/svg+xml", "SVG")
    _error(b"%PDF-1.7\n...", "image bytes (12 bytes)", "PDF")


def test_http_failures_name_the_url(server):
    _error(f"{server}/missing.png", f"{server}/missing.png", "HTTP 404")
    _error(f"{server}/error", "/error", "HTTP 500")
    _error(f"{server}/page", "/page", "HTML page")
    _error(f"{server}/to-ftp", "/to-ftp", "non-http")
    _error(f"{server}/big.png", "/big.png", "too large", max_bytes=50_000)


def test_download_timeout(server):
    start = time.monotonic()
    _error(f"{server}/slow.png", "/slow.png", "timed out", timeout=0.3)
    assert time.monotonic() - start < 1.4


def test_refused_connection():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/img.png"
    _error(url, url, "connection refused")


def test_other_schemes_are_refused_before_any_io():
    _error("ftp://example.com/cat.png", "ftp://example.com/cat.png", "unsupported URL scheme 'ftp'")
    _error("s3://bucket/cat.png", "s3://bucket/cat.png", "unsupported URL scheme")
    _error(12, "int")


def test_bad_data_uris_and_bytes():
    _error("data:image/png;base64,!!!notbase64!!!", "data URI image/png (", "base64")
    _error("data:image/png;base64", "data URI", "malformed")
    _error(b"\x00\x01\x02garbage" * 10, "image bytes (100 bytes)", "not an image")


def test_size_and_pixel_limits(tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(PNG)
    _error(path, "img.png", "too large", max_bytes=50)
    _error(PNG, "image bytes", f"too large ({len(PNG)} bytes; the limit is 50 bytes)", max_bytes=50)
    _error(path, "img.png", "too many pixels", "40x20", max_pixels=799)
    assert load_image(path, max_pixels=800).size == (40, 20)
    # Decompression bombs: headers promising 144 MP (over our default limit) and 400 MP (over
    # PIL's own hard limit); refused before any pixel is decoded.
    _error(_png_header(12_000, 12_000), "image bytes", "too many pixels", "12000x12000")
    _error(_png_header(20_000, 20_000), "image bytes", "too many pixels")


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")
