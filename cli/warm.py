"""The first run's kernel compilation, done before the user's prompt and said out loud.

numba compiles the CPU kernels on their first call (15-35 s on 2 cores), then reads them
from its disk cache (kernels/jit.py) in well under a second. Left to the first prompt, that
time lands in its prefill and first tokens ("12 tokens at 0.5 tok/s") with no word about why.
So a front end asks `needs_warmup(model)` after loading; when true it announces compilation
and calls `warmup(model)`: a short prefill (past the tile threshold) and a few decode steps,
which compile exactly the kernels this model's path calls. A marker in the kernel cache,
keyed on the CPU and the path (dtype, weight widths), lists the kernels that warm-up
compiled; it holds while numba's cache has them all for this install (a new clone or copy
has new source files, which numba's cache does not recognise), so compiling is announced
once per install, kernel version and kind of model. `pixlocal warmup` does it
ahead of time, and `quantize`/`pull` do it at their end.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral

WARM_TOKENS = 24  # > cpu.PREFILL_MIN (16): the prompt takes the prefill path a chat would
WARM_STEPS = 3


def marker(dtype: object, bits: list[int], device: object) -> Path:
    """The file that says this path's kernels were compiled (in the kernel cache)."""
    from pixlocal.host import cpu
    from pixlocal.kernels import jit

    key = f"{cpu().model}|{sorted(cpu().flags)}|{dtype}|{sorted(bits)}|{device}"
    return jit.cache_dir() / f"warm-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _marker(m: Pixtral) -> Path:
    bits = {mod.spec.bits for mod in m.model.modules()
            if getattr(mod, "spec", None) is not None and hasattr(mod.spec, "bits")}
    return marker(m.dtype, sorted(bits), m.device)


def up_to_date(path: Path) -> bool:
    """Whether the marker at `path` lists kernels that numba's cache all has now."""
    from pixlocal.kernels import jit
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(names, list) and not set(names) & set(jit.uncompiled())


def needs_warmup(m: Pixtral) -> bool:
    """Whether this model's first forward would compile CPU kernels."""
    from pixlocal.kernels import jit
    if not jit.uncompiled():
        return False  # no numba kernel loaded, or all compiled / cached
    return not up_to_date(_marker(m))


def warmup(m: Pixtral) -> float:
    """Run a short prompt and a few decode steps (compiling what they call); the seconds it
    took. The model's cache is reset after."""
    import torch

    from pixlocal.kernels import jit
    from pixlocal.prompt import Encoded
    before = set(jit.uncompiled())
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, m.args.vocab_size, (WARM_TOKENS - 1,), generator=g).tolist()
    m.reset()
    try:
        tok = int(m.prefill(Encoded([1] + ids, [])).argmax())
        for _ in range(WARM_STEPS):
            tok = int(m.decode(tok).argmax())
    finally:
        m.reset()
    done = _marker(m)
    try:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(sorted(before - set(jit.uncompiled()))) + "\n")
    except OSError:
        pass  # read-only cache: announced again next time, still correct
    return time.perf_counter() - t0
