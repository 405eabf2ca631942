"""Where each part of the model runs: the memory plan, the CPU/GPU split, moving modules.

A plan is made before any weight reaches the GPU, from the bytes each tensor takes once loaded
(`checkpoint_bytes`, or `estimate_bytes` for a shape alone), the free VRAM and the context:

  GPU need = weights of the GPU parts + KV cache of the GPU layers for `context_len` tokens
             + activations for the largest prefill (an image at the largest size) + a margin

Parts: `embeddings` (always CPU: a lookup of a few rows, 1.3 GB of VRAM saved), `layers.N`,
`output` (final norm + head), `vision` (encoder + adapter). Priority for the GPU: the vision
encoder (compute-bound prefill), then decoder layers from the last one down (llama.cpp's
`-ngl` order: the activation vector crosses the CPU/GPU boundary once per token), then the
output head once every layer is there. `gpu_layers="auto"` takes as many layers as fit;
an explicit count that does not fit is refused with the numbers (never an out-of-memory error
mid-answer). The runner then refuses prompts longer than `context_len` (ContextOverflow).

Activation estimates are upper bounds from the shapes (per-token rows of every live
intermediate, float32 where a kernel returns float32, one dequantized weight tile); SDPA on
CUDA needs no (L, L) score matrix for these calls (no mask, or causal).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .checkpoint import Checkpoint
from .config import PixtralArgs
from .errors import PixlocalError
from .qformat import QuantSpec

GiB, MiB = 1 << 30, 1 << 20
MARGIN_FIXED = 256 * MiB  # allocator fragmentation, cuBLAS workspace, the learnt perms
MARGIN_FRAC = 0.05  # of the free VRAM
_TILE_ELEMS = 1 << 24  # = kernels.cuda.TILE_ELEMS (not imported: that module is the GPU's)
_LAYER = re.compile(r"layers\.(\d+)\.")
_DECODER_LINEAR = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")

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


def checkpoint_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, int]:
    """Bytes per tensor once loaded: quantized tensors (qweight/scales/zeros) as stored, every
    other tensor cast to `dtype` (what loader.load_model does)."""
    out = {}
    quant = set(ckpt.quantized()) if ckpt.kind == "pixlocal" else set()
    for name in ckpt.names():
        base, _, leaf = name.rpartition(".")
        stored = base in quant and leaf in ("qweight", "scales", "zeros")
        size = ckpt.dtype(name).itemsize if stored else dtype.itemsize
        out[name] = math.prod(ckpt.shape(name)) * size
    return out


def estimate_bytes(args: PixtralArgs, quant: QuantSpec | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes per tensor of a model of `args` shape under the quantizer's default recipe:
    decoder linears `quant`, head and embeddings int8-g32, the rest (norms, vision) `dtype`;
    quant None: everything `dtype`."""
    from .model import PixtralModel

    with torch.device("meta"):
        model = PixtralModel(args)
    head = QuantSpec.default(8)
    out = {}
    for name, p in model.named_parameters():
        spec = None
        if quant is not None and p.dim() == 2:
            if _DECODER_LINEAR.fullmatch(name):
                spec = quant
            elif name in ("output.weight", "tok_embeddings.weight"):
                spec = head
        if spec is None:
            out[name] = p.numel() * dtype.itemsize
            continue
        base, groups = name.removesuffix(".weight"), p.numel() // spec.group_size
        out[f"{base}.qweight"] = p.numel() * spec.bits // 8  # as a quantized shard holds it
        out[f"{base}.scales"] = groups * (1 if spec.bits == 4 else 2)
        if spec.bits == 4:
            out[f"{base}.zeros"] = groups
    return out


def kv_bytes_per_layer(args: PixtralArgs, context_len: int, itemsize: int = 2) -> int:
    return 2 * args.n_kv_heads * args.head_dim * context_len * itemsize


def image_tokens(args: PixtralArgs, max_image_size: int | None = None) -> int:
    """Patches of the largest image the encoder takes (a square at max size)."""
    v = args.vision_encoder
    if v is None:
        return 0
    side = (max_image_size or v.image_size) // v.patch_size
    return side * side


def activation_bytes(args: PixtralArgs, context_len: int, image_patches: int,
                     itemsize: int = 2) -> tuple[int, int]:
    """(vision, decoder) activation peaks: the largest image through the encoder + adapter;
    a prefill of that image's tokens (+ 512 of text) through one decoder layer + the head."""
    tile = 2 * _TILE_ELEMS * 4
    vis = 0
    v = args.vision_encoder
    if v is not None and image_patches:
        D, F = v.hidden_size, v.intermediate_size
        vis = image_patches * (4 * D * itemsize + 3 * F * itemsize + F * 4 + D * 4
                               + args.dim * (4 + itemsize)) + tile
    L = min(context_len, image_patches + int(image_patches ** 0.5) + 512)
    D, F = args.dim, args.hidden_dim
    dec = L * (3 * F * itemsize + F * 4 + 4 * D * 4 + args.n_heads * args.head_dim * 4) \
        + args.vocab_size * 4 + tile
    return vis, dec


@dataclass(frozen=True)
class Plan:
    weights: dict[str, int]  # part → bytes, in model order
    devices: dict[str, str]  # part → "cpu" | "cuda"
    kv_per_layer: int  # bytes of one layer's KV cache for context_len tokens
    activations: int  # bytes reserved on the GPU for activations (0 if nothing is there)
    context_len: int
    image_patches: int
    free_vram: int | None  # None: no CUDA device
    budget: int  # bytes the plan may use on the GPU
    margin: int

    @property
    def n_layers(self) -> int:
        return sum(p.startswith("layers.") for p in self.weights)

    @property
    def gpu_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.devices[f"layers.{i}"] == "cuda"]

    def device_of(self, part: str) -> str:
        return self.devices[part]

    def _on(self, dev: str) -> tuple[int, int]:
        w = sum(b for p, b in self.weights.items() if self.devices[p] == dev)
        kv = self.kv_per_layer * sum(self.devices[f"layers.{i}"] == dev
                                     for i in range(self.n_layers))
        return w, kv

    @property
    def gpu_bytes(self) -> int:
        w, kv = self._on("cuda")
        return w + kv + self.activations

    @property
    def cpu_bytes(self) -> int:
        return sum(self._on("cpu"))

    def describe(self) -> str:
        """A few lines for `pixlocal info` / `pixlocal doctor`."""
        n, g = self.n_layers, self.gpu_layers
        def fmt(b: int) -> str:
            return f"{b / GiB:.2f} GiB"
        layer = max((b for p, b in self.weights.items() if p.startswith("layers.")), default=0)
        lines = [f"context {self.context_len} tokens, largest image {self.image_patches} "
                 f"patches; KV cache {fmt(self.kv_per_layer * n)} "
                 f"({fmt(self.kv_per_layer)}/layer), one decoder layer {fmt(layer)}"]
        if self.free_vram is None:
            lines.append(f"no CUDA device: everything on the CPU ({fmt(self.cpu_bytes)} of "
                         "weights + KV cache)")
            return "\n".join(lines)
        span = "none" if not g else f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0])
        others = ", ".join(p for p in ("vision", "output", "embeddings")
                           if p in self.devices and self.devices[p] == "cuda") or "nothing else"
        w, kv = self._on("cuda")
        lines += [f"GPU: {len(g)}/{n} decoder layers ({span}) + {others}; weights {fmt(w)} + "
                  f"KV {fmt(kv)} + activations {fmt(self.activations)} = "
                  f"{fmt(self.gpu_bytes)} of {fmt(self.budget)} usable "
                  f"({fmt(self.free_vram)} free, margin {fmt(self.margin)})",
                  f"CPU: {n - len(g)} decoder layers + "
                  + (", ".join(p for p, d in self.devices.items()
                               if d == "cpu" and not p.startswith("layers.")) or "nothing")
                  + f"; {fmt(self.cpu_bytes)} of weights + KV cache"]
        return "\n".join(lines)


def plan(args: PixtralArgs, tensor_bytes: Mapping[str, int], free_vram: int | None,
         context_len: int, largest_image_patches: int, gpu_layers: GpuLayers = "auto",
         max_vram: int | None = None, itemsize: int = 2) -> Plan:
    """Split the model between CPU and GPU (module docstring). PixlocalError if an explicit
    `gpu_layers` cannot fit."""
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
        if name.endswith(".zeros"):
            extra[part_of(name)] += 2 * b
    kv = kv_bytes_per_layer(args, context_len, itemsize)
    act_v, act_d = activation_bytes(args, context_len, largest_image_patches, itemsize)
    devices = {p: "cpu" for p in weights}
    if free_vram is None:
        return Plan(weights, devices, kv, 0, context_len, largest_image_patches, None, 0, 0)
    margin = MARGIN_FIXED + int(MARGIN_FRAC * free_vram)
    budget = max(0, free_vram - margin)
    if max_vram is not None:
        budget = min(budget, max_vram)
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
        devices[f"layers.{i}"] = "cuda"
    if head:
        devices["output"] = "cuda"
    if vision:
        devices["vision"] = "cuda"
    for p, d in devices.items():
        weights[p] += extra[p] if d == "cuda" else 0  # weights as they sit on their device
    act = max(act_v if vision else 0, act_d if k else 0)
    return Plan(weights, devices, kv, act, context_len, largest_image_patches, free_vram,
                budget, margin)


def free_vram(device: torch.device | str = "cuda") -> int | None:
    """Free bytes on a CUDA device (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def modules_of(model: nn.Module, part: str) -> list[nn.Module]:
    m = re.fullmatch(r"layers\.(\d+)", part)
    if m:
        return [model.layers[int(m[1])]]  # type: ignore[index]
    names = {"embeddings": ["tok_embeddings"], "output": ["norm", "output"],
             "vision": ["vision_encoder", "vision_language_adapter"]}[part]
    return [getattr(model, n) for n in names if hasattr(model, n)]


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def apply(model: nn.Module, plan: Plan, gpu: torch.device | str = "cuda",
          backends: Mapping[str, str] | None = None) -> None:
    """Move every part to its planned device ("cuda" parts to `gpu`, which a test may set to
    "cpu") and point each quantized linear at the qmatmul backend of its device type
    (`backends`: device type → backend name; default kernels.default_backend)."""
    from . import kernels

    for part, where in plan.devices.items():
        dev = torch.device(gpu) if where == "cuda" else torch.device("cpu")
        for mod in modules_of(model, part):
            mod.to(dev)
            kind = "cuda" if where == "cuda" else "cpu"
            for sub in mod.modules():
                if hasattr(sub, "backend") and hasattr(sub, "qtensor"):
                    pick = getattr(kernels, "default_backend", None)
                    sub.backend = (backends[kind] if backends is not None and kind in backends
                                   else pick(dev) if pick is not None else sub.backend)
                    if hasattr(sub, "prepare"):
                        sub.prepare()
