"""Where each part of the model runs: the memory plan and the CPU/GPU split.

A plan is made before any weight is read, from the bytes each tensor takes once loaded
(memory.checkpoint_bytes, or memory.estimate_bytes for a shape alone), the free VRAM and the
context:

  GPU need = weights of the GPU parts + KV cache of the GPU layers for `context_len` tokens
             + activations for the largest prefill (an image at the largest size) + a margin

Parts: `embeddings` (always CPU: a lookup of a few rows, 1.3 GB of VRAM saved), `layers.N`,
`output` (final norm + head), `vision` (encoder + adapter). Priority for the GPU: the vision
encoder (compute-bound prefill), then decoder layers from the last one down (llama.cpp's
`-ngl` order: the activation vector crosses the CPU/GPU boundary once per token), then the
output head once every layer is there. `gpu_layers="auto"` takes as many layers as fit;
an explicit count that does not fit is refused with the numbers (never an out-of-memory error
mid-answer). The loader builds each part on its planned device; where consecutive parts
sit on different devices `insert_boundaries` moves the activations across (the model itself
never moves a tensor). The runner refuses prompts longer than `context_len` (ContextOverflow).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import PixtralArgs
from .errors import PixlocalError
from .memory import activation_bytes, kv_bytes_per_layer

GiB, MiB = 1 << 30, 1 << 20
MARGIN_FIXED = 256 * MiB  # allocator fragmentation, cuBLAS workspace, the learnt perms
MARGIN_FRAC = 0.05  # of the free VRAM
_LAYER = re.compile(r"layers\.(\d+)\.")

GPU, CPU = "cuda", "cpu"  # the device kinds a plan names
GpuLayers = int | Literal["auto"]


def part_of(name: str) -> str:
    """The plan part a checkpoint/state-dict tensor belongs to."""
    m = _LAYER.match(name)
    if m:
        return f"layers.{m[1]}"
    head = name.split(".")[0]
    parts = {"tok_embeddings": "embeddings", "norm": "output", "output": "output",
             "vision_encoder": "vision", "vision_language_adapter": "vision"}
    if head not in parts:
        raise PixlocalError(f"tensor {name!r} belongs to no known part of a Pixtral model")
    return parts[head]


@dataclass(frozen=True)
class Plan:
    weights: dict[str, int]  # part → bytes, in model order
    devices: dict[str, str]  # part → CPU | GPU
    kv_per_layer: int  # bytes of one layer's KV cache for context_len tokens
    activations: int  # bytes reserved on the GPU for activations (0 if nothing is there)
    context_len: int
    image_patches: int
    free_vram: int | None  # None: no CUDA device
    budget: int  # bytes the plan may use on the GPU: min(free, --max-vram) less the margin
    margin: int

    @property
    def n_layers(self) -> int:
        return sum(p.startswith("layers.") for p in self.weights)

    @property
    def gpu_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.on_gpu(f"layers.{i}")]

    def on_gpu(self, part: str) -> bool:
        return self.devices.get(part) == GPU

    def bytes_on(self, dev: str) -> tuple[int, int]:
        """(weights, KV cache) bytes on `dev` (CPU or GPU)."""
        w = sum(b for p, b in self.weights.items() if self.devices[p] == dev)
        kv = self.kv_per_layer * sum(self.devices[f"layers.{i}"] == dev
                                     for i in range(self.n_layers))
        return w, kv

    @property
    def gpu_bytes(self) -> int:
        w, kv = self.bytes_on(GPU)
        return w + kv + self.activations

    @property
    def cpu_bytes(self) -> int:
        return sum(self.bytes_on(CPU))

    @property
    def label(self) -> str:
        """Where the decoder runs, in words: "cpu", "cuda 40/40 layers", "cpu+cuda 22/40
        layers" (bench and the GPU smoke test print it)."""
        n, g = self.n_layers, len(self.gpu_layers)
        if not g and GPU not in self.devices.values():
            return CPU
        return f"{GPU if g == n else f'{CPU}+{GPU}'} {g}/{n} layers"


def plan(args: PixtralArgs, tensor_bytes: Mapping[str, int], free_vram: int | None,
         context_len: int, largest_image_patches: int, gpu_layers: GpuLayers = "auto",
         max_vram: int | None = None, itemsize: int = 2, int4_pairs: bool = True) -> Plan:
    """Split the model between CPU and GPU (module docstring). PixlocalError if an explicit
    `gpu_layers` cannot fit. `int4_pairs`: the GPU repacks int4 for tinygemm, whose bf16
    (scale, zero) pairs take 4 bytes a group where the file has 2 (not below compute
    capability 8.0, on ROCm or without tinygemm: the stored layout stays)."""
    n = args.n_layers
    if context_len < 1:
        raise PixlocalError(f"context length must be >= 1 token, got {context_len}")
    if gpu_layers != "auto" and not (isinstance(gpu_layers, int) and 0 <= gpu_layers <= n):
        raise PixlocalError(f"--gpu-layers {gpu_layers!r}: expected auto or 0..{n} (this model "
                            f"has {n} decoder layers)")
    weights: dict[str, int] = {"embeddings": 0, **{f"layers.{i}": 0 for i in range(n)},
                               "output": 0}
    if args.vision_encoder is not None:
        weights["vision"] = 0
    extra = dict.fromkeys(weights, 0)  # on the GPU an int4 weight's 2 bytes of scale and zero
    for name, b in tensor_bytes.items():  # per group become tinygemm's 4-byte bf16 pair
        weights[part_of(name)] += b
        if name.endswith(".zeros") and int4_pairs:
            extra[part_of(name)] += 2 * b
    kv = kv_bytes_per_layer(args, context_len, itemsize)
    act_v, act_d = activation_bytes(args, context_len, largest_image_patches, itemsize)
    devices = {p: CPU for p in weights}
    if free_vram is None:
        return Plan(weights, devices, kv, 0, context_len, largest_image_patches, None, 0, 0)
    cap = free_vram if max_vram is None else min(free_vram, max_vram)
    margin = MARGIN_FIXED + int(MARGIN_FRAC * cap)  # inside the cap: --max-vram is a ceiling
    budget = max(0, cap - margin)
    vision = "vision" in weights and weights["vision"] + act_v <= budget
    fixed = weights["vision"] if vision else 0

    def need(k: int, head: bool) -> int:  # GPU bytes with the last k layers (and the head)
        act = max(act_v if vision else 0, act_d if k else 0)
        return (fixed + act + sum(weights[f"layers.{i}"] + extra[f"layers.{i}"] + kv
                                  for i in range(n - k, n))
                + (weights["output"] + extra["output"] if head else 0))

    if gpu_layers == "auto":
        k = next(k for k in range(n, -1, -1) if need(k, False) <= budget)
    else:
        k = gpu_layers
        if need(k, False) > budget:
            most = next(j for j in range(n, -1, -1) if need(j, False) <= budget)
            raise PixlocalError(
                f"--gpu-layers {k} needs {need(k, False) / GiB:.2f} GiB of VRAM (weights, KV "
                f"cache for {context_len} tokens, activations), only {budget / GiB:.2f} GiB "
                f"is usable: use --gpu-layers {most} or auto, or a shorter context")
    head = k == n and need(k, True) <= budget
    for i in range(n - k, n):
        devices[f"layers.{i}"] = GPU
    if head:
        devices["output"] = GPU
    if vision:
        devices["vision"] = GPU
    for p, d in devices.items():
        weights[p] += extra[p] if d == GPU else 0  # weights as they sit on their device
    act = max(act_v if vision else 0, act_d if k else 0)
    return Plan(weights, devices, kv, act, context_len, largest_image_patches, free_vram,
                budget, margin)


def insert_boundaries(model: nn.Module, device_of: Mapping[str, torch.device]) -> None:
    """Where a decoder layer, or the final norm, sits on another device than what runs before
    it, move its inputs there first (a forward pre-hook): the activation crosses the
    CPU/GPU boundary once per crossing, and the model's code stays device-free. `device_of`:
    plan part → the device it was built on."""
    prev = device_of["embeddings"]
    stops = [(model.layers[i], device_of[f"layers.{i}"]) for i in range(len(model.layers))]
    for mod, dev in stops + [(model.norm, device_of["output"])]:
        if dev != prev:
            mod.register_forward_pre_hook(_mover(dev))
        prev = dev


def _mover(dev: torch.device):  # noqa: ANN202
    def move(_mod: nn.Module, args: tuple) -> tuple:  # (h, freqs_cis, layer, cache, start)
        return tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args)
    return move
