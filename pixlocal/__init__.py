"""pixlocal: run Mistral's Pixtral-12B locally, quantized, on CPU or GPU.

    import pixlocal
    model = pixlocal.load("~/models/pixtral-12b")
    for step in model.stream([{"role": "user", "content": [
            {"type": "image", "image": "photo.png"}, {"type": "text", "text": "Caption this."}]}],
            max_tokens=100):
        print(step.text, end="", flush=True)

torch is imported on first use of the API, so `import pixlocal` and the CLI's --help stay fast.
"""

from typing import Any

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
