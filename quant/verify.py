"""`pixlocal verify DIR`: the full integrity check of a quantized dir.

What `pixlocal.load` checks on every load (index, metadata and format_version, each shard
present with its recorded size, headers, names and shapes against params.json) plus what it
skips because hashing 8 GB takes seconds: every shard's sha256 against the index, and the
index's weight_map against the shards' actual contents.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pixlocal.checkpoint import QUANT_INDEX, read_quant_index
from pixlocal.errors import FormatError, ModelNotFound
from pixlocal.integrity import remember, stamp, sha256_file
from pixlocal.loader import load_model
from pixlocal.qformat import read_metadata
from pixlocal.shards import SafetensorsFile


@dataclass
class VerifyResult:
    path: Path
    quant: str  # the default scheme from the metadata ("int4-g32")
    shards: int
    tensors: int
    bytes: int  # shard bytes


def verify_dir(path: str | Path, progress: Callable[[int, int], None] | None = None
               ) -> VerifyResult:
    """Check a quantized dir completely; FormatError (one line naming the file) on the first
    problem. `progress(done, total)` follows the hashing in bytes."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise ModelNotFound(f"{d}: model directory not found")
    if not (d / QUANT_INDEX).is_file():
        raise FormatError(f"{d}: not a pixlocal quantized model (no {QUANT_INDEX}); verify "
                          "checks the output of `pixlocal quantize`")
    index = read_quant_index(d)  # metadata, format_version, presence, sizes
    shards = index["shards"]
    total, done = sum(int(s["size"]) for s in shards.values()), [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    stored: dict[str, str] = {}
    for name in sorted(shards):  # headers and metadata first: the clearer error if both fail
        f = SafetensorsFile(d / name)
        read_metadata(f.metadata, str(f.path))
        stored.update({key: name for key in f.keys()})
    for name in sorted(shards):
        p = d / name
        want = shards[name].get("sha256")
        got = sha256_file(p, tick)
        if got != want:
            raise FormatError(f"{p}: sha256 {got[:16]}… does not match {QUANT_INDEX} "
                              f"({str(want)[:16]}…): corrupt; re-quantize or re-download")
        remember({str(p.resolve()): stamp(p, str(want))})  # later loads need not hash it
    if stored != index["weight_map"]:
        diff = sorted(set(stored.items()) ^ set(index["weight_map"].items()))
        raise FormatError(f"{d / QUANT_INDEX}: weight_map disagrees with the shards about "
                          f"{diff[0][0]!r} ({len(diff)} entries differ)")
    load_model(d, "cpu", "bfloat16")  # every tensor's name and shape against params.json
    if not (d / "tekken.json").is_file():
        raise FormatError(f"{d}: missing tekken.json (the tokenizer)")
    return VerifyResult(d, index["metadata"].get("quant", "?"), len(shards), len(stored), total)
