"""Where numba keeps the compiled CPU kernels, and whether they still need compiling.

numba's on-disk cache is keyed on each decorated function's own file (mtime and size), yet
our kernels inline code from other files (llir.py's IR loops, cpu.py's and cpu_attn.py's
kernels inside cpu_decode's whole-layer decode). So the cache lives in a directory named by a
digest of every source under kernels/ and numba's version: any edit to any kernel source, or
another numba, starts a fresh cache, with no digest kept by hand. numba's own key adds the
CPU (name and features), so a machine with another CPU compiles its own.

The directory is under $XDG_CACHE_HOME (default ~/.cache)/pixlocal/numba, or $NUMBA_CACHE_DIR
when the user set one. This module imports no numba until asked (kernels/__init__ calls
configure() before any kernel module loads).
"""

from __future__ import annotations

import hashlib
import os
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).parent


def sources_digest() -> str:
    """sha256 (16 hex) of kernels/*.py and numba's version."""
    h = hashlib.sha256()
    for p in sorted(HERE.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    try:
        h.update(metadata.version("numba").encode())
    except metadata.PackageNotFoundError:
        pass
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    user = os.environ.get("PIXLOCAL_NUMBA_CACHE") or os.environ.get("NUMBA_CACHE_DIR")
    if user:
        return Path(user).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "pixlocal" / "numba" / sources_digest()


def configure() -> None:
    """Point numba's cache at cache_dir() (before the kernels' dispatchers are created)."""
    d = str(cache_dir())
    os.environ["NUMBA_CACHE_DIR"] = d
    if "numba" in sys.modules:  # numba read its environment already
        sys.modules["numba"].config.CACHE_DIR = d


def _dispatchers() -> list:
    """The cached (cache=True) numba functions of the loaded kernel modules."""
    from numba.core.dispatcher import Dispatcher
    out, seen = [], set()
    for name, mod in list(sys.modules.items()):
        if not name.startswith(__package__ + ".") or mod is None:
            continue
        for obj in vars(mod).values():
            if isinstance(obj, Dispatcher) and getattr(obj, "_cache", None) is not None \
                    and id(obj) not in seen and type(obj._cache).__name__ != "NullCache":
                seen.add(id(obj))
                out.append(obj)
    return out


def uncompiled() -> list[str]:
    """Names of loaded kernels with neither a compiled version in memory nor a usable entry
    in the disk cache: what a first call would compile (seconds each). [] where numba's
    cache cannot be inspected (then nothing is announced)."""
    names = []
    try:
        for d in _dispatchers():
            if d.overloads:
                continue
            if not d._cache._cache_file._load_index():  # {} when missing or stale
                names.append(d.py_func.__qualname__)
    except Exception:  # noqa: BLE001 - a private numba API: say nothing rather than fail
        return []
    return names


def compiled_fraction(names: list[str]) -> float:
    """How many of `names` (from uncompiled()) have been compiled since (for progress)."""
    if not names:
        return 1.0
    done = sum(1 for d in _dispatchers() if d.py_func.__qualname__ in names and d.overloads)
    return done / len(names)


def preload() -> int:
    """Load the disk-cached versions of the loaded kernels now, for this CPU: a first call
    would otherwise load them inside the first token (~0.5 s in all, which a tiny model's
    stats line showed as "6 tokens at 0.9 tok/s"). How many were loaded; 0 where numba's
    cache cannot be read this way (its private API changed): calls then load them as before."""
    n = 0
    try:
        for d in _dispatchers():
            if d.overloads:
                continue
            magic = d.targetctx.codegen().magic_tuple()
            for key in d._cache._cache_file._load_index():
                if key[1] == magic:
                    d.compile(key[0])  # found in the cache: loaded, not compiled
                    n += 1
    except Exception:  # noqa: BLE001 - a private numba API: never fail a load over it
        return n
    return n
