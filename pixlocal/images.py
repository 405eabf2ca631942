"""Turn whatever the user calls an image (path, file:// or http(s) URL, data URI, bytes, PIL image)
into a fully decoded PIL image, or raise one ImageError whose one-line message names the source
and what is wrong with it. Pixel preprocessing itself is left to mistral-common (prompt.py)."""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

from pixlocal.errors import ImageError, ImageTooLarge

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image

MAX_BYTES = 50 * 2**20
MAX_PIXELS = 100_000_000
USER_AGENT = "pixlocal/0.1 (+https://github.com/mistralai/mistral-common)"
_CHUNK = 1 << 16
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1"}
_READABLE = {"PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF"), (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)  # fmt: skip


def load_image(src: ImageSource, *, timeout: float = 30.0, max_bytes: int | None = None,
               max_pixels: int | None = None) -> Image.Image:
    """Load and fully decode an image.

    Args:
        src: a local path (str, Path or file:// URI), an http(s) URL, a data URI
            (``data:image/png;base64,...``), raw encoded bytes, or a PIL image (returned as is).
        timeout: seconds allowed for a whole download.
        max_bytes: refuse encoded files, downloads and data URIs larger than this (default:
            $PIXLOCAL_MAX_IMAGE_BYTES, else MAX_BYTES).
        max_pixels: refuse images with more pixels than this (decompression bombs; default:
            $PIXLOCAL_MAX_PIXELS, else MAX_PIXELS). Pillow's own bomb check
            (2 x ``Image.MAX_IMAGE_PIXELS``) still applies above that.

    Returns:
        A loaded single-frame image (first frame of animations), EXIF orientation applied, in
        a mode mistral-common's RGB conversion reads correctly (16-bit, 32-bit and float grey
        rescaled to 8-bit L, LAB converted to RGB).

    Raises:
        ImageError: with a one-line message naming the source and the problem.
    """
    if isinstance(src, Image.Image):
        return src
    max_bytes = _limit(max_bytes, "PIXLOCAL_MAX_IMAGE_BYTES", MAX_BYTES)
    max_pixels = _limit(max_pixels, "PIXLOCAL_MAX_PIXELS", MAX_PIXELS)
    data, name = _read_source(src, timeout=timeout, max_bytes=max_bytes)
    return _decode(data, name, max_pixels)


def _limit(value: int | None, env: str, default: int) -> int:
    if value is not None:
        return value
    text = os.environ.get(env, "").replace("_", "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise ImageError(f"${env}={os.environ[env]!r}: not a positive whole number")
    return int(text)


def _read_source(src: object, *, timeout: float, max_bytes: int) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        name = f"image bytes ({len(data)} bytes)"
        _check_bytes(len(data), max_bytes, name)
        return data, name
    if isinstance(src, Path):
        return _read_file(src.expanduser(), _one_line(str(src)), max_bytes)
    if not isinstance(src, str):
        raise ImageError(f"unsupported image source of type {type(src).__name__}")
    if not src.strip():
        raise ImageError("empty image path or URL")
    if src[:5].lower() == "data:":
        return _read_data_uri(src, max_bytes)
    match = _SCHEME.match(src)
    if match is None:
        return _read_file(Path(src).expanduser(), _one_line(src), max_bytes)
    name, scheme = _one_line(src, 200), match.group(1).lower()
    if scheme == "file":
        parts = urllib.parse.urlsplit(src)
        if parts.netloc not in ("", "localhost"):
            raise ImageError(f"{name}: file URIs naming another host are not supported")
        return _read_file(Path(urllib.request.url2pathname(parts.path)), name, max_bytes)
    if scheme in ("http", "https"):
        return _fetch(src, name, timeout, max_bytes), name
    raise ImageError(f"{name}: unsupported URL scheme '{scheme}' (use http, https, file or data)")


def _read_file(path: Path, name: str, max_bytes: int) -> tuple[bytes, str]:
    try:
        if path.is_dir():
            raise ImageError(f"{name}: is a directory, not an image file")
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"{name}: not found") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read ({e.strerror or e})") from None
    _check_bytes(len(data), max_bytes, name, exact=False)
    return data, name


def _read_data_uri(uri: str, max_bytes: int) -> tuple[bytes, str]:
    header, sep, payload = uri.partition(",")
    media = header[5:].split(";")[0]
    name = f"data URI{' ' + _one_line(media[:40]) if media else ''} ({len(uri)} bytes)"
    if not sep:
        raise ImageError(f"{name}: malformed, no ',' before the payload")
    if not header.lower().endswith(";base64"):
        data = urllib.parse.unquote_to_bytes(payload)
        _check_bytes(len(data), max_bytes, name)
        return data, name
    payload = "".join(payload.split())
    _check_bytes(len(payload) * 3 // 4, max_bytes, name)
    altchars = b"-_" if ("-" in payload or "_" in payload) else None
    try:
        data = base64.b64decode(payload + "=" * (-len(payload) % 4), altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{name}: payload is not valid base64") from None
    return data, name


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would also follow redirects to ftp://; an image URL has no business going there.
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, hdrs: Any,
                         newurl: str) -> Any:
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            fp.close()  # urllib only closes the redirect response when we return a request
            raise urllib.error.URLError(f"redirected to a non-http URL {_one_line(newurl, 200)}")
        return super().redirect_request(req, fp, code, msg, hdrs, newurl)


def _fetch(url: str, name: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT,
                                                   "Accept": "image/*,*/*;q=0.5"})
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit():
                _check_bytes(int(length), max_bytes, name)
            return _read_response(response, name, max_bytes, timeout)
    except urllib.error.HTTPError as e:
        e.close()
        raise ImageError(f"{name}: HTTP {e.code} {_one_line(str(e.reason))}".rstrip()) from None
    except urllib.error.URLError as e:
        raise ImageError(f"{name}: {_network_problem(e.reason, timeout)}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, bad replies
        raise ImageError(f"{name}: {_network_problem(e, timeout)}") from None


def _network_problem(reason: object, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, socket.gaierror):
        return "host not found"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error ({_one_line(str(reason.reason or reason))})"
    if isinstance(reason, OSError) and reason.strerror:
        return f"download failed ({_one_line(reason.strerror)})"
    return f"download failed ({_one_line(str(reason) or type(reason).__name__)})"


def _read_response(response: BinaryIO, name: str, max_bytes: int, timeout: float) -> bytes:
    # Chunked, so that neither a lying Content-Length nor a server that trickles bytes forever
    # (the socket timeout only bounds each read) can hold us beyond max_bytes or the timeout.
    # read1: one socket read at a time; read(n) would wait for all n bytes of a trickle.
    deadline, buffer = time.monotonic() + timeout, bytearray()
    read = getattr(response, "read1", response.read)
    while chunk := read(_CHUNK):
        buffer += chunk
        _check_bytes(len(buffer), max_bytes, name, exact=False)
        if time.monotonic() > deadline:
            raise ImageError(f"{name}: timed out after {timeout:g} s")
    return bytes(buffer)


def _check_bytes(n: int, max_bytes: int, name: str, *, exact: bool = True) -> None:
    if n > max_bytes:
        size = _size(n) if exact else f"more than {_size(max_bytes)}"
        raise ImageTooLarge(f"{name}: too large ({size}; the limit is {_size(max_bytes)})")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    # Pillow warns (UserWarning) about odd tags and corrupt EXIF of damaged files: the library
    # never prints, and such a file either decodes or becomes an ImageError below.
    with warnings.catch_warnings(action="ignore"):
        if not data:
            raise ImageError(f"{name}: empty (0 bytes)")
        kind = _sniff(data)
        # We check the pixel count ourselves against max_pixels (PIL's bomb warning is silenced
        # above). PIL raises a bare variety of exceptions on hostile data (OSError, SyntaxError,
        # struct.error, ...), hence the broad excepts below: every failure must be an ImageError.
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            raise ImageTooLarge(f"{name}: too many pixels (Pillow's limit is {limit:,})") from None
        except Exception as e:
            raise ImageError(_unreadable(name, kind, data, e)) from None
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"{name}: too many pixels ({width}x{height} = {width * height:,}; "
                             f"the limit is {max_pixels:,}, set by max_pixels or "
                             "$PIXLOCAL_MAX_PIXELS)")
        try:
            image.load()  # the first frame of an animation; truncated files fail here, not later
        except Exception as e:
            raise ImageError(_corrupt(name, image.format or kind, e)) from None
        return _to_8bit(_upright(image, name))


def _upright(image: Image.Image, name: str) -> Image.Image:
    # mistral-common does not apply EXIF orientation, but a phone photo stored sideways with an
    # orientation tag should reach the model the way its owner sees it. Returns a detached,
    # single-frame copy either way.
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF is not worth refusing an otherwise fine picture
        return image.copy()
    assert upright is not None, name
    return upright


def _to_8bit(image: Image.Image) -> Image.Image:
    # mistral-common's convert("RGBA") clips 16-bit, 32-bit and float grey to 0..255 (most of a
    # 16-bit PNG or TIFF turns white, a 0..1 float TIFF black) and copies LAB's channels as if
    # they were RGB. Bring those to 8 bits first so the model sees the actual picture.
    if image.mode == "LAB":
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if image.mode.startswith("I;16"):
        return _grey8(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode not in ("I", "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    pixels = np.where(np.isfinite(pixels), pixels, 0.0)  # NaN/inf in a float TIFF: black
    lo, hi = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    if lo >= 0 and hi <= (1.0 if image.mode == "F" else 0.0):
        return _grey8(pixels * 255.0)  # float images in 0..1
    if lo >= 0 and hi <= 255:
        return _grey8(pixels)
    if lo >= 0 and hi <= 65535:  # 16-bit data in a 32-bit container
        return _grey8(pixels / 257.0)
    if hi == lo:  # one value outside 0..65535: a flat picture, shown mid-grey
        return _grey8(np.full(pixels.shape, 128.0))
    return _grey8((pixels - lo) * (255.0 / (hi - lo)))  # anything else: stretched to 0..255


def _grey8(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))  # 2-D -> "L"


def _sniff(data: bytes) -> str | None:
    head = data[:512]
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":  # ISO media: major brand + compatible brands name the codec
        brands = {head[i : i + 4] for i in range(8, min(int.from_bytes(head[:4]), 64), 4)}
        if brands & {b"avif", b"avis"}:
            return "AVIF"
        if brands & _HEIF_BRANDS:
            return "HEIC/HEIF"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text:
        return "SVG"
    return "HTML" if text.startswith((b"<!doctype html", b"<html")) else None


def _unreadable(name: str, kind: str | None, data: bytes, error: Exception) -> str:
    if kind == "HTML":
        return f"{name}: got an HTML page, not an image"
    if kind in _READABLE or (kind == "AVIF" and features.check("avif")):
        return _corrupt(name, kind, error)
    if kind is not None:
        return f"{name}: unsupported image format {kind} (convert it to PNG or JPEG)"
    if _looks_like_text(data[:512]):
        return f"{name}: not an image (it contains text)"
    return f"{name}: not an image (unrecognized or unsupported format)"


def _looks_like_text(head: bytes) -> bool:
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")  # the window may cut a char
    return all(c.isprintable() and c != "\ufffd" or c in "\t\r\n" for c in text)


def _corrupt(name: str, kind: str | None, error: Exception) -> str:
    what = f"{kind} data" if kind else "image data"
    if "truncated" in str(error).lower() or isinstance(error, EOFError):
        return f"{name}: truncated {what}"
    detail = "" if isinstance(error, UnidentifiedImageError) else f" ({_one_line(str(error))})"
    return f"{name}: corrupt {what}{detail}"


def _one_line(text: str, limit: int = 1000) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
