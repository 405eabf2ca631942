"""Quantized matmul dispatch: qmatmul(x, q, backend) → the backend's kernel of the same name.

Backends are modules imported on first use (numba and CUDA stay unloaded until asked for):
"ref" (kernels/ref.py, plain torch, the oracle); cpu.py (numba) and cuda.py add their rows to
BACKENDS when they land.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..qformat import QTensor

BACKENDS: dict[str, str] = {"ref": "pixlocal.kernels.ref"}


def backend_module(backend: str) -> ModuleType:
    """The module implementing `backend`; ValueError for an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown qmatmul backend {backend!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def qmatmul(x: torch.Tensor, q: QTensor, backend: str = "ref") -> torch.Tensor:
    """x (L, K) @ dequantize(q).T → (L, M) float32, by `backend`."""
    out: torch.Tensor = backend_module(backend).qmatmul(x, q)
    return out
