"""Quantized matmul dispatch: qmatmul(x, q, backend) → the backend's kernel of the same name.

Backends are modules imported on first use (numba and CUDA stay unloaded until asked for):
"ref" (kernels/ref.py, plain torch, the oracle) and "cpu" (kernels/cpu.py, numba: int8
activations and integer dot products for decode, and for prefill where bfloat16 is emulated;
dequantized tiles + torch GEMM for prefill where it is native).
A backend may repack a weight once: `prepare(q, backend)` returns what its kernels read
(the QTensor itself for "ref", interleaved row blocks for "cpu"), and `qmatmul` takes either.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

import torch

from ..qformat import QTensor

BACKENDS: dict[str, str] = {"ref": "pixlocal.kernels.ref", "cpu": "pixlocal.kernels.cpu",
                            "cuda": "pixlocal.kernels.cuda"}


def backend_module(backend: str) -> ModuleType:
    """The module implementing `backend`; ValueError for an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown qmatmul backend {backend!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def prepare(q: QTensor, backend: str = "ref") -> Any:
    """The weight in the form `backend`'s kernels read (done once, at load or first use)."""
    return backend_module(backend).prepare(q)


def fuse(ps: list[Any], backend: str) -> tuple[Any, list[Any]] | None:
    """Prepared weights of layers that share their input, stacked by rows into one (a single
    qmatmul then reads all of them), with each weight as a view into it; None where the
    backend does not stack or the weights differ in layout."""
    f = getattr(backend_module(backend), "fuse", None)
    return None if f is None else f(ps)


def qmatmul(x: torch.Tensor, q: Any, backend: str = "ref") -> torch.Tensor:
    """x (L, K) @ dequantize(q).T → (L, M) by `backend`, float32 (a backend may answer
    bfloat16 for bfloat16 x: cpu's prefill does); q a QTensor or prepare(q, backend)."""
    out: torch.Tensor = backend_module(backend).qmatmul(x, q)
    return out


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int
                     ) -> torch.Tensor:
    """One query token against the first S positions of a layer's cache (ref.py documents
    the shapes), by the default backend of q's device: numba's on a CPU that has it."""
    mod = backend_module(default_backend(q.device))
    if not hasattr(mod, "decode_attention"):
        mod = backend_module("ref")
    out: torch.Tensor = mod.decode_attention(q, k, v, S)
    return out


def decode_stack(layers: list[tuple[Any, ...]], n_heads: int, n_kv_heads: int, head_dim: int,
                 eps: float, backend: str) -> Any:
    """A callable running one decode token through every decoder layer in one kernel call
    per layer (cpu_decode.DecodeStack documents the arguments), or None where `backend` has
    no such kernel or the weights are not its prepared form."""
    if backend != "cpu":
        return None
    from .cpu_decode import CpuQ, DecodeStack
    if not all(isinstance(w, CpuQ) for lw in layers for w in lw[1:3] + lw[4:]):
        return None
    return DecodeStack(layers, n_heads, n_kv_heads, head_dim, eps)


def native_bf16() -> bool:
    """Whether torch multiplies bfloat16 natively on this CPU (AVX512-BF16 or AMX). Elsewhere
    its bfloat16 GEMM is emulated: 15-20 GFLOP/s against 100-110 for float32 on an AVX2 host
    (512 x 5120 x 4096, 2 threads), so prefill and dtype "auto" use float32 there."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def default_backend(device: str | torch.device) -> str:
    """$PIXLOCAL_BACKEND if set (e.g. "ref": exact float math, slow); else "cpu" for a CPU
    device when numba and a SIMD instruction set (AVX2/AVX-512) are there, else "ref"."""
    forced = os.environ.get("PIXLOCAL_BACKEND", "").strip()
    if forced:
        backend_module(forced)  # ValueError for an unknown name
        return forced
    if torch.device(device).type != "cpu":
        return "cuda" if torch.device(device).type == "cuda" else "ref"
    try:
        cpu = backend_module("cpu")
    except ImportError:
        return "ref"
    return "cpu" if cpu.SIMD else "ref"
