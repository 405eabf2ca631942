"""The whole-layer decode fast path: a decode step through the backend's one-call-per-layer
kernel (Backend.decode_stack; the cpu backend's kernels/cpu_decode.py) instead of the
modules. The loader installs it (`build`) for the decoder's first layers that have wq/wk/wv
and w1/w3 stacked (qlinear.fuse) on one backend with such a kernel: every layer on a CPU, or
with a partial offload the CPU layers (the plan puts the GPU layers last), the layers after
them then running as modules (their device boundary moves the activation). The runner calls
it for each decode step. It answers None, and the modules run, wherever it does not apply:
another dtype or device, or weights replaced since it was built."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .qlinear import Fused, QLinear
from .rope import freqs_cis_1d

# Shapes: D model dim · Dh head dim


class FastDecode:
    stack_device = torch.device("cpu")  # the kernels read numpy views of CPU tensors

    def __init__(self, model: nn.Module, stack: Any, mods: list[tuple[QLinear, object]],
                 norms: list[tuple[torch.Tensor, int]], n: int) -> None:
        self.model, self.stack, self.mods, self.norms, self.n = model, stack, mods, norms, n
        self.norm_mods = [m for blk in model.layers[:n]
                          for m in (blk.attention_norm, blk.ffn_norm)]

    def __call__(self, h: torch.Tensor, start: int, cache: Any) -> torch.Tensor | None:
        """h (1, D) at position start through every layer (the first `n` in one kernel call
        each, the rest as modules), or None if this cannot."""
        n = self.n
        if (h.dtype not in (torch.bfloat16, torch.float32) or h.device != self.stack_device
                or any(k.dtype != h.dtype for k in cache.k[:n])
                or any(m.prepared() is not p for m, p in self.mods)
                or any(mod.weight is not w or w._version != v
                       for mod, (w, v) in zip(self.norm_mods, self.norms, strict=True))):
            return None
        a = self.model.args
        pos = torch.arange(start, start + 1, device=h.device)
        freqs_cis = freqs_cis_1d(pos, a.head_dim, a.rope_theta)  # (1, Dh/2)
        out: torch.Tensor = self.stack(h, start, cache.k[:n], cache.v[:n], freqs_cis)
        for i in range(n, len(self.model.layers)):  # a partial offload's GPU layers
            out = self.model.layers[i](out, freqs_cis, i, cache, start)
        return out


def _stacked(blk: nn.Module) -> tuple[list[QLinear], tuple] | None:
    """A layer's QLinears and its weights as decode_stack takes them, if stacked."""
    a, f = blk.attention, blk.feed_forward
    if not (isinstance(a.qkv, Fused) and isinstance(f.w13, Fused)
            and isinstance(a.wo, QLinear) and isinstance(f.w2, QLinear)):
        return None
    n1, n2 = blk.attention_norm.weight, blk.ffn_norm.weight
    return ([*a.qkv.mods, a.wo, *f.w13.mods, f.w2],
            (n1, a.qkv.p, a.wo.prepared(), n2, f.w13.p, f.w2.prepared()))


def build(model: nn.Module) -> FastDecode | None:
    """The fast path for the longest run of `model`'s first decoder layers on one backend
    with a whole-layer kernel, or None where there is none."""
    mods: list[tuple[QLinear, object]] = []
    norms: list[tuple[torch.Tensor, int]] = []
    layers = []
    backend = None
    for blk in model.layers:
        got = _stacked(blk)
        if got is None or len({m.backend for m in got[0]} | ({backend} - {None})) != 1:
            break
        backend = got[0][0].backend
        mods += [(m, m.prepared()) for m in got[0]]
        norms += [(w, w._version) for w in (blk.attention_norm.weight, blk.ffn_norm.weight)]
        layers.append(got[1])
    if backend is None:
        return None
    r = model.args
    stack = backend.decode_stack(layers, r.n_heads, r.n_kv_heads, r.head_dim, r.norm_eps)
    return None if stack is None else FastDecode(model, stack, mods, norms, len(layers))
