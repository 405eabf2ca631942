"""Shard checksums: hashed on the first load of a quantized model, then remembered.

`pixlocal quantize` records each shard's sha256 in the index. Hashing 8 GB takes seconds, so
a load hashes only shards it has not seen before with the same size and modification time:
the first load pays once (at disk speed; the pages it reads are the ones the load maps next),
later loads compare three numbers. What was verified is kept in $PIXLOCAL_HOME/verified.json
(a cache: when it cannot be written, loads simply hash again). A shard whose bytes changed
(bit rot, a bad copy, an interrupted download that kept its size) is refused with one line
that names it, instead of loading and answering noise.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from .errors import FormatError

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def sha256_file(path: Path, tick: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file read in 16 MiB blocks; `tick(bytes)` after each block."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            if tick is not None:
                tick(len(block))
    return h.hexdigest()


def _store() -> Path:
    from .config import home
    return home() / "verified.json"


def _read_store() -> dict[str, list]:
    try:
        d = json.loads(_store().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def stamp(p: Path, sha256: str) -> list:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, sha256]


def unverified(model_dir: Path, shards: dict[str, dict]) -> list[str]:
    """Shards of a quantized dir (index "shards": {name: {"size", "sha256"}}) not yet hashed
    in their current state (size, mtime and recorded checksum)."""
    known = _read_store()
    return [n for n, s in sorted(shards.items())
            if known.get(str((model_dir / n).resolve())) != stamp(model_dir / n,
                                                                   str(s.get("sha256")))]


def verify_shards(model_dir: Path, shards: dict[str, dict], progress: Progress | None = None,
                  names: list[str] | None = None) -> None:
    """Hash `names` (default: every shard) against the index; FormatError naming the first
    that differs. Remembers each match (see the module docstring)."""
    names = sorted(shards) if names is None else names
    total, done = sum(int(shards[n]["size"]) for n in names), [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress(done[0], total)

    ok: dict[str, list] = {}
    try:
        for n in names:
            p, want = model_dir / n, str(shards[n].get("sha256"))
            got = sha256_file(p, tick)
            if got != want:
                raise FormatError(
                    f"{p}: sha256 {got[:16]}… does not match the index's {want[:16]}…: the "
                    f"file is corrupt; re-quantize or re-download it (`pixlocal verify "
                    f"{model_dir}` checks the whole model)")
            ok[str(p.resolve())] = stamp(p, want)
    finally:
        if ok:
            remember(ok)


def remember(entries: dict[str, list]) -> None:
    path = _store()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = _read_store()
        known.update(entries)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the next load hashes again


def check_once(model_dir: Path, shards: dict[str, dict], progress: Progress | None = None
               ) -> None:
    """verify_shards for the shards not verified before ($PIXLOCAL_VERIFY=0 skips it)."""
    if os.environ.get("PIXLOCAL_VERIFY", "").strip() == "0":
        return
    todo = unverified(model_dir, shards)
    if todo:
        verify_shards(model_dir, shards, progress, todo)
