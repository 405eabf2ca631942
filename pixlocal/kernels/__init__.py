"""Quantized matmul kernels behind one Backend object per device kind (backend.py).

Backends are modules imported on first use (numba and CUDA stay unloaded until asked for):
"ref" (kernels/ref.py, plain torch, the oracle), "cpu" (kernels/cpu.py, numba: int8
activations and integer dot products for decode, and for prefill where bfloat16 is emulated;
dequantized tiles + torch GEMM for prefill where it is native) and "cuda" (kernels/cuda.py).
A backend may repack a weight once: `prepare(q, backend)` returns what its kernels read
(the QTensor itself for "ref", interleaved row blocks for "cpu"), and `qmatmul` takes either.
The functions here take a backend by name, for tests and benchmarks; the runtime holds
Backend objects (`backend.get`, `backend.for_device`).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from . import jit
from ..qformat import QTensor
from .backend import KINDS, UnknownBackend, get, native_bf16  # noqa: F401

jit.configure()  # numba's cache keyed on the kernel sources, before any kernel module loads

BACKENDS: dict[str, str] = {name: kind.module_name for name, kind in KINDS.items()}


def backend_module(backend: str) -> ModuleType:
    """The kernel module implementing `backend`; UnknownBackend (a ValueError) otherwise."""
    return get(backend).k


def prepare(q: QTensor, backend: str = "ref") -> Any:
    """The weight in the form `backend`'s kernels read (done once, at load or first use)."""
    return get(backend).prepare(q)


def fuse(ps: list[Any], backend: str) -> tuple[Any, list[Any]] | None:
    """Prepared weights of layers that share their input, stacked by rows into one (a single
    qmatmul then reads all of them), with each weight as a view into it; None where the
    backend does not stack or the weights differ in layout."""
    return get(backend).fuse(ps)


def qmatmul(x: torch.Tensor, q: Any, backend: str = "ref") -> torch.Tensor:
    """x (L, K) @ dequantize(q).T → (L, M) by `backend`, float32 (a backend may answer
    bfloat16 for bfloat16 x: cpu's prefill does); q a QTensor or prepare(q, backend)."""
    return get(backend).qmatmul(x, q)


def default_backend(device: str | torch.device) -> str:
    """The backend name for `device` (backend.default_name): $PIXLOCAL_BACKEND if set, else
    "cpu" on a CPU with numba and AVX2, "cuda" on a CUDA device, else "ref"."""
    from .backend import default_name
    return default_name(device)
