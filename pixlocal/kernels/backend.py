"""One Backend object per device kind: what a layer's weights and attention run on.

A Backend is chosen once per layer, from the plan, by the loader (`for_device`); nothing
outside kernels/ compares backend or device names. Each wraps its kernel module:

  ref   kernels/ref.py   plain torch, float32, the oracle; runs on any device
  cpu   kernels/cpu.py   numba: repacked int4/int8 GEMV and tiles, decode attention,
                         a whole decoder layer per call for decode (cpu_decode.py)
  cuda  kernels/cuda.py  tinygemm int4 + dequantize-a-tile GEMM; its ops have CPU twins, so
                         tests run it on the CPU

A Backend owns: `prepare` (a QTensor → what its kernels read, once, at load), `qmatmul`,
`fuse` (weights sharing an input stacked into one), `attention` (prefill and decode),
`decode_stack` (an optional whole-layer decode fast path), `copies_weights` (prepare
returns a copy: the stored, memory-mapped tensors' pages can be released), `weight_bytes`
(what one matmul reads of a prepared weight: bench's bytes/token) and `compute_dtype` (what
a part loaded in a dtype computes in on a device: float16 for bfloat16 on GPUs below
compute capability 8.0).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from functools import cache
from types import ModuleType
from typing import Any

import torch

from ..errors import ConfigError, PixlocalError
from ..layers import attention as sdpa
from ..qformat import QTensor


class UnknownBackend(ConfigError, ValueError):
    """A backend name (e.g. $PIXLOCAL_BACKEND) that names no backend."""


class Backend:
    """The reference backend; the others override what they do differently."""

    name = "ref"
    module_name = "pixlocal.kernels.ref"
    copies_weights = False  # prepare() returns the stored tensors themselves

    def __init__(self) -> None:
        self.k: ModuleType = importlib.import_module(self.module_name)
        self._decode = getattr(self.k, "decode_attention", None)

    def __repr__(self) -> str:
        return self.name

    def runs_on(self, device: torch.device) -> bool:
        return True

    def prepare(self, q: QTensor) -> Any:
        """The weight as this backend's kernels read it (once, at load)."""
        return self.k.prepare(q)

    def qmatmul(self, x: torch.Tensor, p: Any) -> torch.Tensor:
        """x (L, K) @ W.T → (L, M), float32 (cpu's prefill answers bfloat16 for bfloat16 x)."""
        out: torch.Tensor = self.k.qmatmul(x, p)
        return out

    def weight_bytes(self, p: Any) -> int:
        """Bytes of weight memory one qmatmul reads for the prepared weight `p`: cpu's CpuQ
        says it (interleaved blocks); a QTensor (stored, or cuda's tinygemm packing with its
        scale/zero pairs) is its three tensors (the CPU twin's extra copy of the values and
        the shared block permutation are not read per call)."""
        n = getattr(p, "nbytes", None)  # cpu's CpuQ
        if isinstance(n, int):
            return n
        ts = (p.qweight, p.scales, p.zeros)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def compute_dtype(self, device: torch.device, dtype: torch.dtype) -> torch.dtype:
        """The dtype a part loaded in `dtype` on `device` computes in."""
        return dtype

    def int4_pairs(self, device: torch.device) -> bool:
        """Whether prepare() widens int4's 1-byte scale and zero codes to a 4-byte pair per
        group on `device` (the plan counts it)."""
        return False

    def fuse(self, ps: list[Any]) -> tuple[Any, list[Any]] | None:
        """Prepared weights sharing their input stacked by rows into one (one qmatmul reads
        them all), with each as a view into it; None where this backend does not stack."""
        f = getattr(self.k, "fuse", None)
        return None if f is None else f(ps)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int
                  ) -> torch.Tensor:
        """q (H, L, Dh), k/v (Hkv, >= S, Dh) → (H, L, Dh) (layers.attention's contract). One
        query reads the cache through the backend's decode kernel (torch's GQA SDPA is slow
        for it)."""
        if q.shape[1] == 1 and self._decode is not None:
            out: torch.Tensor = self._decode(q, k, v, S)
            return out
        return sdpa(q, k, v, S)

    def decode_stack(self, layers: list[tuple[Any, ...]], n_heads: int, n_kv_heads: int,
                     head_dim: int, eps: float) -> Callable[..., torch.Tensor] | None:
        """A callable running one decode token through every decoder layer, one kernel call
        per layer (cpu_decode.DecodeStack documents the arguments); None where none exists."""
        return None


class CpuBackend(Backend):
    name = "cpu"
    module_name = "pixlocal.kernels.cpu"
    copies_weights = True  # interleaved row blocks, a copy

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def decode_stack(self, layers: list[tuple[Any, ...]], n_heads: int, n_kv_heads: int,
                     head_dim: int, eps: float) -> Callable[..., torch.Tensor] | None:
        from .cpu_decode import CpuQ, DecodeStack
        if not all(isinstance(w, CpuQ) for lw in layers for w in lw[1:3] + lw[4:]):
            return None
        return DecodeStack(layers, n_heads, n_kv_heads, head_dim, eps)


class CudaBackend(Backend):
    name = "cuda"
    module_name = "pixlocal.kernels.cuda"
    copies_weights = True  # tinygemm's packed layout replaces the stored one

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int
                  ) -> torch.Tensor:
        """In the call shapes torch's fused CUDA kernels take (cuda_attn.py)."""
        from .cuda_attn import attention
        return attention(q, k, v, S)

    def compute_dtype(self, device: torch.device, dtype: torch.dtype) -> torch.dtype:
        out: torch.dtype = self.k.compute_dtype(dtype, self.k.capability(device))
        return out

    def int4_pairs(self, device: torch.device) -> bool:
        return self.k.tinygemm_missing(device) is None  # tinygemm's bf16 (scale, zero)


KINDS: dict[str, type[Backend]] = {"ref": Backend, "cpu": CpuBackend, "cuda": CudaBackend}


@cache
def get(name: str) -> Backend:
    """The Backend called `name` (one instance each); UnknownBackend for another name."""
    if name not in KINDS:
        raise UnknownBackend(f"unknown qmatmul backend {name!r}; known: {', '.join(KINDS)}")
    return KINDS[name]()


def native_bf16() -> bool:
    """Whether torch multiplies bfloat16 natively on this CPU (AVX512-BF16 or AMX). Elsewhere
    its bfloat16 GEMM is emulated: 15-20 GFLOP/s against 100-110 for float32 on an AVX2 host
    (512 x 5120 x 4096, 2 threads), so prefill and dtype "auto" use float32 there."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def forced() -> str | None:
    """$PIXLOCAL_BACKEND if set (UnknownBackend for a name that is no backend)."""
    name = os.environ.get("PIXLOCAL_BACKEND", "").strip()
    if not name:
        return None
    if name not in KINDS:
        raise UnknownBackend(f"PIXLOCAL_BACKEND={name!r}: unknown qmatmul backend; known: "
                             f"{', '.join(KINDS)} (unset it to choose per device)")
    return name


def default_name(device: str | torch.device) -> str:
    """$PIXLOCAL_BACKEND if set (e.g. "ref": exact float math, slow); else "cpu" for a CPU
    device when numba and a SIMD instruction set (AVX2/AVX-512) are there, "cuda" for a CUDA
    device, else "ref"."""
    name = forced()
    if name is not None:
        return name
    dev = torch.device(device)
    if dev.type != "cpu":
        return "cuda" if dev.type == "cuda" else "ref"
    try:
        cpu = importlib.import_module(CpuBackend.module_name)
    except ImportError:
        return "ref"
    return "cpu" if cpu.SIMD else "ref"


def for_device(device: torch.device) -> Backend:
    """The backend for layers placed on `device`. PixlocalError (one line) where
    $PIXLOCAL_BACKEND names one that cannot run there."""
    b = get(default_name(device))
    if not b.runs_on(device):
        raise PixlocalError(f"PIXLOCAL_BACKEND={b.name} cannot run layers placed on "
                            f"{device.type}; unset it, set it to ref, or load with "
                            f"--device {b.name}")
    return b


def parse_device(device: str | torch.device) -> torch.device:
    """auto / cpu / cuda / cuda:N → a torch device; PixlocalError for one not present."""
    try:
        d = torch.device("cuda" if str(device) == "auto" and torch.cuda.is_available() else
                         "cpu" if str(device) == "auto" else device)
    except (RuntimeError, TypeError):  # "CPU", "tpu", "cuda:x": torch's message is long
        raise PixlocalError(f"unknown device {str(device)!r} (choose auto, cpu, cuda or "
                            "cuda:N)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise PixlocalError("--device cuda: no CUDA device is available (torch "
                            f"{torch.__version__} sees none); use --device cpu")
    if d.type not in ("cpu", "cuda"):
        raise PixlocalError(f"unsupported device {device!r} (choose cpu, cuda or auto)")
    return d


def is_gpu(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def free_vram(device: torch.device | str) -> int | None:
    """Free bytes on a CUDA device; None for another device or without CUDA."""
    if not is_gpu(device) or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def limit_vram(device: torch.device | str, max_bytes: int) -> float:
    """Cap this process's allocations on a CUDA device at `max_bytes` (--max-vram): torch's
    allocator then raises past it instead of taking the whole card. The fraction set."""
    d = torch.device(device)
    total = torch.cuda.get_device_properties(d).total_memory
    frac = min(1.0, max_bytes / total)
    torch.cuda.set_per_process_memory_fraction(frac, d)
    return frac


def synchronize(devices: Iterable[torch.device | str]) -> None:
    """Wait for the work queued on each GPU among `devices` (before reading a clock: CUDA
    kernels run asynchronously, so a timing taken without it misses them)."""
    for d in {torch.device(x) for x in devices}:
        if is_gpu(d):
            torch.cuda.synchronize(d)
