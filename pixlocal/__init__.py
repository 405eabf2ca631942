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

# torch's OpenMP workers spin after each parallel region by default; between our numba kernels
# that spinning steals the cores (int4 decode 11 -> 20 GB/s with PASSIVE, bench/README.md).
# Read once when torch loads, so it must be set before: `import pixlocal` comes first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
_LAZY = {"load": "generate", "Pixtral": "generate", "ChatSession": "generate",
         "Step": "generate"}
__all__ = ["load", "Pixtral", "ChatSession", "Step", "PixlocalError", "ModelNotFound",
           "ConfigError", "FormatError", "ImageError", "ContextOverflow", "PromptError",
           "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'pixlocal' has no attribute {name!r}")
