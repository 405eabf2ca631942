"""pixlocal: run Mistral's Pixtral-12B locally, quantized, on CPU or GPU.

    import pixlocal
    model = pixlocal.load("~/models/pixtral-12b")
    for step in model.stream([{"role": "user", "content": [
            {"type": "image", "image": "photo.png"}, {"type": "text", "text": "Caption this."}]}],
            max_tokens=100):
        print(step.text, end="", flush=True)

torch is imported on first use of the API, so `import pixlocal` and the CLI's --help stay fast.
"""

import os
from typing import Any

# OpenMP's workers (torch's libgomp, which numba's "omp" layer uses too: one pool) by default
# spin without bound after each parallel region, stealing the cores from what runs between
# (int4 decode 11 -> 20 GB/s with PASSIVE, bench/README.md). Asleep, though, a worker takes
# ~55 us to wake on a 2-vCPU VM, and a decode step opens ~40 regions: bounded spinning keeps
# it awake between them (a 2-thread region 57 -> 1.9 us; decode 11.4-12.5 -> 14.7-16.7 tok/s,
# 8-layer Nemo) and lets it sleep ~28 ms after the last. Read once, when torch loads: `import
# pixlocal` must come first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "1000000")

from .errors import (
    ConfigError,
    ContextOverflow,
    FormatError,
    ImageError,
    ModelNotFound,
    PixlocalError,
    PromptError,
)

__version__ = "0.1.0"
_LAZY = {"load": "generate", "Pixtral": "generate", "ChatSession": "session",
         "Step": "generate"}
__all__ = ["load", "Pixtral", "ChatSession", "Step", "PixlocalError", "ModelNotFound",
           "ConfigError", "FormatError", "ImageError", "ContextOverflow", "PromptError",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pixlocal' has no attribute {name!r}")
