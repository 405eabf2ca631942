"""quantize_checkpoint: a Mistral or HF model dir → a pixlocal quantized dir, streamed.

Output (the format is documented in pixlocal/qformat.py and pixlocal/checkpoint.py):
  OUT/quantized-NNNNN-of-NNNNN.safetensors  shards of at most `shard_bytes` (a tensor and its
                                            scales never straddle two), each with __metadata__
  OUT/quantized.index.json                  metadata, per-shard size and sha256, weight_map
  OUT/params.json, OUT/tekken.json          the source's (a Mistral params.json from HF too)

Memory stays bounded: tensors are read from the memory-mapped source one block of rows at a
time, quantized, appended to the shard, and their pages unmapped again (so the source's
pages never pile up in this process's RSS). Everything is written into OUT.partial-PID and
renamed to OUT only when complete, index last: a killed run leaves no OUT and nothing that
loads; the next run removes partial dirs whose process is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pixlocal.checkpoint import (
    QUANT_INDEX,
    Checkpoint,
    open_checkpoint,
    quant_shard_name,
    tokenizer_path,
)
from pixlocal.config import read_args
from pixlocal.errors import FormatError, ModelNotFound, PixlocalError
from pixlocal.integrity import sha256_file
from pixlocal.qformat import (
    F16_NORMAL,
    FORMAT_VERSION,
    INT8_SCALE_DTYPE,
    QTensor,
    QuantSpec,
    dequantize,
    make_metadata,
    stored_tensors,
)
from pixlocal.shards import StreamingWriter

from .quantizer import quantize
from .recipe import Recipe, Target, describe, kind_of

SHARD_BYTES = 2_000_000_000
_CHUNK_WEIGHTS = 1 << 24  # weights read, quantized and written at once (32 MB of bf16)
_SLOW_ENV = "PIXLOCAL_QUANTIZE_SLOW"  # test hook: seconds to sleep after each tensor
# int8 scales are ~absmax/127 (the search picks among absmax/(124..127), refit): a group
# absmax in this range surely gives a scale inside fp16's normal range [2^-14, 65504]
_F16_SAFE = (F16_NORMAL[0] * 136, F16_NORMAL[1] * 118)
_SAMPLE_ROWS = 64  # rows of every block (of ~16M weights) whose error goes into the report
Progress = Callable[[int, int], None]  # (input bytes done, input bytes in all)


@dataclass
class TensorReport:
    name: str
    kind: str  # summary row (recipe.kind_of)
    scheme: str  # "int4-g32", "bfloat16", "float32 (kept)"
    numel: int
    bytes_in: int
    bytes_out: int
    sq_err: float = 0.0  # Σ (w - ŵ)² over the first _SAMPLE_ROWS rows of every block
    sq_norm: float = 0.0  # Σ w² over the same rows


@dataclass
class Report:
    src: Path
    out: Path
    scheme: str  # the default scheme, as in the metadata
    tensors: list[TensorReport] = field(default_factory=list)
    seconds: float = 0.0
    bytes_in: int = 0  # tensor bytes read from the source
    bytes_out: int = 0  # bytes of the shards (tensors + headers; params/tekken not counted)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_in / 1e6 / max(self.seconds, 1e-9)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bytes out per weight, everything included (norms, bf16 parts)."""
        n = sum(t.numel for t in self.tensors)
        return 8 * sum(t.bytes_out for t in self.tensors) / max(n, 1)

    def by_kind(self) -> list[dict]:
        """One row per tensor kind: tensors, weights, schemes, bits/weight, bytes, rel RMS."""
        rows: dict[str, dict] = {}
        for t in self.tensors:
            r = rows.setdefault(t.kind, {"kind": t.kind, "tensors": 0, "weights": 0,
                                         "schemes": [], "bytes_out": 0, "sq_err": 0.0,
                                         "sq_norm": 0.0})
            r["tensors"] += 1
            r["weights"] += t.numel
            r["bytes_out"] += t.bytes_out
            r["sq_err"] += t.sq_err
            r["sq_norm"] += t.sq_norm
            if t.scheme not in r["schemes"]:
                r["schemes"].append(t.scheme)
        for r in rows.values():
            r["bits_per_weight"] = 8 * r["bytes_out"] / max(r["weights"], 1)
            r["rel_rms"] = (r["sq_err"] / r["sq_norm"]) ** 0.5 if r["sq_norm"] else 0.0
        return list(rows.values())


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    src_dtype: torch.dtype
    target: Target
    scale_dtype: torch.dtype = INT8_SCALE_DTYPE  # int8 only: decided by _prepare_int8

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        t = self.target
        return stored_tensors(self.name, self.shape, self.src_dtype if t is None else t,
                              self.scale_dtype)

    def nbytes_out(self) -> int:
        return sum(d.itemsize * _numel(s) for _, d, s in self.entries())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _rows(ckpt: Checkpoint, item: _Item) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, block) of the source tensor; its pages are unmapped after each block."""
    t = ckpt.get(item.name)
    step = max(1, _CHUNK_WEIGHTS // max(1, _numel(item.shape[1:])))
    for r0 in range(0, item.shape[0], step):
        yield r0, t[r0:r0 + step]
        ckpt.release(item.name)


def _sq(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """Σ (a - b)² (or Σ a²) in float32 with torch's cascaded sum, as a Python float."""
    d = a.float() if b is None else a.float() - b.float()
    return d.pow_(2).sum().item() if b is not None else d.pow(2).sum().item()


def _prepare_int8(ckpt: Checkpoint, item: _Item) -> None:
    """Fix an int8 weight's scale dtype before its shard's header is written: float16 when
    every nonzero group absmax lies in _F16_SAFE, else bfloat16 for the whole tensor (the
    choice qformat.quantize makes for one tensor in one piece, up to that thin margin)."""
    spec = item.target
    assert isinstance(spec, QuantSpec)
    lo, hi = float("inf"), 0.0
    for _, b in _rows(ckpt, item):
        g = b.reshape(b.shape[0], -1, spec.group_size)  # (R, N, G)
        amax = torch.maximum(g.amax(-1), g.amin(-1).neg_()).float()  # (R, N)
        hi = max(hi, amax.max().item())
        lo = min(lo, amax.masked_fill_(amax == 0, float("inf")).min().item())
    fits = hi == 0 or (_F16_SAFE[0] <= lo and hi <= _F16_SAFE[1])
    item.scale_dtype = INT8_SCALE_DTYPE if fits else torch.bfloat16


def _write_item(w: StreamingWriter, ckpt: Checkpoint, item: _Item, rep: TensorReport,
                tick: Callable[[int], None]) -> None:
    """Stream one tensor into the shard; the error of a sample of rows goes into `rep`."""
    t = item.target
    if not isinstance(t, QuantSpec):
        dt = item.src_dtype if t is None else t

        def cast() -> Iterator[torch.Tensor]:
            for _, b in _rows(ckpt, item):
                out = b.to(dt)
                if dt != item.src_dtype:
                    rep.sq_err += _sq(out[:_SAMPLE_ROWS], b[:_SAMPLE_ROWS])
                    rep.sq_norm += _sq(b[:_SAMPLE_ROWS])
                yield out
                tick(b.numel() * b.element_size())
        w.write_parts(item.name, cast())
        return
    side: dict[str, list[torch.Tensor]] = {"scales": [], "zeros": []}
    want = item.entries()[1][1]

    def qweights() -> Iterator[torch.Tensor]:
        for _, b in _rows(ckpt, item):
            q = quantize(b, t, int8_scales=item.scale_dtype)
            if q.scales.dtype != want:  # _prepare_int8's margin makes this impossible
                raise FormatError(f"{item.name}: int8 scales came out {q.scales.dtype}, the "
                                  f"shard header says {want} (a quantizer bug)")
            side["scales"].append(q.scales)
            if q.zeros is not None:
                side["zeros"].append(q.zeros)
            k = min(_SAMPLE_ROWS, b.shape[0])
            sample = QTensor(q.qweight[:k], q.scales[:k], None if q.zeros is None else
                             q.zeros[:k], (k, b.shape[1]), t)
            rep.sq_err += _sq(dequantize(sample), b[:k])
            rep.sq_norm += _sq(b[:k])
            yield q.qweight
            tick(b.numel() * b.element_size())
    entries = item.entries()
    w.write_parts(entries[0][0], qweights())
    for name, _, _ in entries[1:]:
        w.write_parts(name, side[name.rsplit(".", 1)[1]])


def _plan_shards(items: list[_Item], shard_bytes: int) -> list[list[_Item]]:
    shards: list[list[_Item]] = [[]]
    size = 0
    for it in items:
        n = it.nbytes_out()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += n
    return shards


def _clean_stale(out: Path) -> None:
    """Remove OUT.partial-PID dirs left by runs that were killed (their PID is gone)."""
    for p in out.parent.glob(f"{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            continue  # still running (or a PID we may not signal): leave it alone
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def quantize_checkpoint(src: Path, out: Path, *, bits: int = 4, group_size: int | None = None,
                        overrides: tuple[str, ...] | list[str] = (),
                        progress: Progress | None = None,
                        shard_bytes: int = SHARD_BYTES) -> Report:
    """Quantize the model dir `src` (Mistral or HF format) into the new dir `out`.

    bits/group_size set the decoder linears' scheme; `overrides` are 'PATTERN=VALUE' strings
    (quant/recipe.py). `progress(done, total)` is called with input bytes as tensors stream.
    Raises a PixlocalError for a bad source, an existing `out` or a bad recipe; on any error
    the partial output is removed.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise ModelNotFound(f"{src}: model directory not found")
    if out.exists():
        raise PixlocalError(f"{out}: already exists; remove it or choose another output dir")
    recipe = Recipe.build(bits, group_size, overrides)
    args = read_args(src)
    ckpt = open_checkpoint(src, args)
    if ckpt.kind == "pixlocal":
        raise FormatError(f"{src}: already quantized ({ckpt.metadata.get('quant')}); quantize "
                          "the original checkpoint instead")
    names = ckpt.names()
    targets = recipe.plan([(n, ckpt.shape(n)) for n in names])
    items = [_Item(n, ckpt.shape(n), ckpt.dtype(n), targets[n]) for n in names]
    total = sum(_numel(i.shape) * i.src_dtype.itemsize for i in items)
    cfg = src / "params.json" if (src / "params.json").is_file() else src / "config.json"
    source = sha256_file(cfg)
    spec = recipe.default_spec
    meta = {**make_metadata(spec, source), "group_size": str(spec.group_size)}
    report = Report(src, out, spec.name, bytes_in=total)
    done, t0 = [0], time.perf_counter()

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = _plan_shards(items, shard_bytes)
        index: dict = {"metadata": {**meta, "tensors": str(len(items))}, "shards": {},
                       "weight_map": {}}
        slow = float(os.environ.get(_SLOW_ENV) or 0)
        for i, group in enumerate(shards):
            fname = quant_shard_name(i, len(shards))
            for it in group:
                if isinstance(it.target, QuantSpec) and it.target.bits == 8:
                    _prepare_int8(ckpt, it)
            specs = [e for it in group for e in it.entries()]
            with StreamingWriter(tmp / fname, specs, meta) as w:
                for it in group:
                    rep = TensorReport(it.name, kind_of(it.name),
                                       describe(it.target, it.src_dtype), _numel(it.shape),
                                       _numel(it.shape) * it.src_dtype.itemsize, it.nbytes_out())
                    _write_item(w, ckpt, it, rep, tick)
                    report.tensors.append(rep)
                    index["weight_map"].update({e[0]: fname for e in it.entries()})
                    if slow:
                        time.sleep(slow)
            index["shards"][fname] = {"size": (tmp / fname).stat().st_size,
                                      "sha256": sha256_file(tmp / fname)}
        index["metadata"]["total_size"] = str(sum(s["size"] for s in index["shards"].values()))
        shutil.copyfile(tokenizer_path(src, ckpt.kind), tmp / "tekken.json")
        if (src / "params.json").is_file():
            shutil.copyfile(src / "params.json", tmp / "params.json")
        else:
            (tmp / "params.json").write_text(json.dumps(args.to_params(), indent=2) + "\n")
        (tmp / QUANT_INDEX).write_text(json.dumps(index, indent=1) + "\n")
        _fsync_dir(tmp)
        tmp.rename(out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.seconds = time.perf_counter() - t0
    report.bytes_out = int(index["metadata"]["total_size"])
    return report


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["FORMAT_VERSION", "Report", "TensorReport", "quantize_checkpoint", "SHARD_BYTES"]
