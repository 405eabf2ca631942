"""Safetensors files, read and written without holding a checkpoint in memory.

Reading memory-maps the file and checks the header before any tensor is touched: the
8-byte length, the JSON, every dtype, every shape against its byte range, every range
inside the file and no two ranges overlapping. A tensor comes back as a zero-copy view of
the map (pages load on first touch, like llama.cpp's mmap).

Writing streams: the header is computed from (name, dtype, shape) up front, then each
tensor's bytes are appended in order, so a 25 GB file needs one tensor in RAM at a time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FormatError

# safetensors dtype string -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
DTYPE_NAMES = {t: name for name, (t, _) in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec's own bound


class SafetensorsFile:
    """One .safetensors file, validated and memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            f = open(self.path, "rb")
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open ({e.strerror})") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(f"{self.path}: truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or 8 + n > size:
                raise FormatError(f"{self.path}: header length {n} exceeds the file ({size} "
                                  "bytes): truncated or not safetensors")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                raise FormatError(f"{self.path}: header is not valid JSON") from None
            if not isinstance(header, dict):
                raise FormatError(f"{self.path}: header is not a JSON object")
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            if not (isinstance(self.metadata, dict) and all(
                    isinstance(v, str) for v in self.metadata.values())):
                raise FormatError(f"{self.path}: __metadata__ is not a map of strings")
            self.entries = self._validate(header, size - 8 - n)
            self._base = 8 + n
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def _validate(self, header: dict[str, Any], data_size: int) -> dict[str, Any]:
        spans = []
        for name, e in header.items():
            try:
                dtype, shape, (lo, hi) = e["dtype"], e["shape"], e["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise FormatError(f"{self.path}: tensor {name!r} has a malformed entry") from None
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise FormatError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                  f"{repr(dtype)[:40]}")
            if not (isinstance(shape, list) and all(
                    type(s) is int and s >= 0 for s in shape)):
                raise FormatError(f"{self.path}: tensor {name!r} has a bad shape "
                                  f"{repr(shape)[:80]}")
            nbytes = math.prod(shape) * DTYPES[dtype][1]  # Python ints: a lying shape can't wrap
            if not (type(lo) is int and type(hi) is int and 0 <= lo <= hi):
                raise FormatError(f"{self.path}: tensor {name!r} has bad offsets "
                                  f"{repr(e['data_offsets'])[:60]}")
            if hi - lo != nbytes:
                raise FormatError(f"{self.path}: tensor {name!r} is {hi - lo} bytes but "
                                  f"{dtype}{shape} needs {nbytes}")
            if hi > data_size:
                raise FormatError(f"{self.path}: tensor {name!r} ends at byte {hi} but the "
                                  f"file holds {data_size}: truncated")
            spans.append((lo, hi, name))
        spans.sort()
        for (_, h1, a), (l2, _, b) in zip(spans, spans[1:], strict=False):
            if l2 < h1:
                raise FormatError(f"{self.path}: tensors {a!r} and {b!r} overlap")
        return header

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]][0]

    def get(self, name: str) -> torch.Tensor:
        """A read-only view of the mapped bytes (copy it before writing to it)."""
        e = self.entries[name]
        lo, hi = e["data_offsets"]
        t, size = DTYPES[e["dtype"]]
        if hi == lo:
            return torch.empty(e["shape"], dtype=t)
        assert self._mmap is not None
        buf = np.frombuffer(self._mmap, dtype=np.uint8, count=hi - lo, offset=self._base + lo)
        import warnings
        with warnings.catch_warnings():  # the map is read-only; callers never write in place
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(buf, dtype=torch.uint8)
        view = flat.view(t).reshape(e["shape"])
        # safetensors does not promise aligned offsets; kernels may assume aligned rows
        return view.clone() if (self._base + lo) % size else view

    def release(self, name: str) -> None:
        """Unmap the pages of tensor `name` from this process (they stay in the OS page cache
        and load again on the next touch): keeps a streaming pass's RSS bounded."""
        lo, hi = self.entries[name]["data_offsets"]
        if self._mmap is not None and hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            start = (self._base + lo) // mmap.PAGESIZE * mmap.PAGESIZE
            self._mmap.madvise(mmap.MADV_DONTNEED, start, self._base + hi - start)


def _header_bytes(specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                  metadata: dict[str, str] | None) -> tuple[bytes, int]:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    off = 0
    for name, dtype, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * DTYPES[DTYPE_NAMES[dtype]][1]
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned
    return raw, off


class StreamingWriter:
    """Write one safetensors file tensor by tensor, in the order of `specs`.

    specs: (name, dtype, shape) of every tensor, fixed before the first write.
    """

    def __init__(self, path: str | Path, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = [(n, d, tuple(s)) for n, d, s in specs]
        raw, self.data_bytes = _header_bytes(self.specs, metadata)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._i = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        shape = self.specs[self._i][2]
        assert tuple(t.shape) == shape, (name, t.shape, shape)  # name and dtype: write_parts
        self.write_parts(name, [t])

    def write_parts(self, name: str, parts: Iterable[torch.Tensor]) -> None:
        """Write the next tensor from consecutive row blocks (bounded memory for big ones)."""
        exp_name, dtype, shape = self.specs[self._i]
        assert name == exp_name, (name, exp_name)
        want, n = int(np.prod(shape, dtype=np.int64)) * DTYPES[DTYPE_NAMES[dtype]][1], 0
        for t in parts:
            assert t.dtype == dtype, (name, t.dtype, dtype)
            t = t.detach().contiguous().cpu()
            if t.numel():
                self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            n += t.numel() * t.element_size()
        assert n == want, f"{name}: wrote {n} bytes, expected {want}"
        self._i += 1

    def close(self) -> None:
        assert self._i == len(self.specs), f"{self.path}: wrote {self._i} of {len(self.specs)}"
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


def save_file(tensors: dict[str, torch.Tensor], path: str | Path,
              metadata: dict[str, str] | None = None) -> None:
    """Small-file convenience: all tensors at once, via the streaming writer."""
    with StreamingWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                         metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
