"""The whole-layer decode fast path: a decode step through the backend's one-call-per-layer
kernel (Backend.decode_stack; the cpu backend's kernels/cpu_decode.py) instead of the
modules. The loader installs it (`build`) where every decoder layer has wq/wk/wv and w1/w3
stacked (qlinear.fuse) on one backend that has such a kernel; the runner calls it for each
decode step. It answers None, and the modules run, wherever it does not apply: another
dtype or device, or weights replaced since it was built."""

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
                 norms: list[tuple[torch.Tensor, int]]) -> None:
        self.model, self.stack, self.mods, self.norms = model, stack, mods, norms
        self.norm_mods = [m for blk in model.layers for m in (blk.attention_norm, blk.ffn_norm)]

    def __call__(self, h: torch.Tensor, start: int, cache: Any) -> torch.Tensor | None:
        """h (1, D) at position start through every layer, or None if this cannot."""
        if (h.dtype not in (torch.bfloat16, torch.float32) or h.device != self.stack_device
                or any(k.dtype != h.dtype for k in cache.k)
                or any(m.prepared() is not p for m, p in self.mods)
                or any(mod.weight is not n or n._version != v
                       for mod, (n, v) in zip(self.norm_mods, self.norms, strict=True))):
            return None
        a = self.model.args
        pos = torch.arange(start, start + 1, device=h.device)
        freqs_cis = freqs_cis_1d(pos, a.head_dim, a.rope_theta)  # (1, Dh/2)
        out: torch.Tensor = self.stack(h, start, cache.k, cache.v, freqs_cis)
        return out


def build(model: nn.Module) -> FastDecode | None:
    """The fast path for `model`'s decoder, or None where it does not apply."""
    mods: list[tuple[QLinear, object]] = []
    norms: list[tuple[torch.Tensor, int]] = []
    layers = []
    for blk in model.layers:
        a, f = blk.attention, blk.feed_forward
        if not (isinstance(a.qkv, Fused) and isinstance(f.w13, Fused)
                and isinstance(a.wo, QLinear) and isinstance(f.w2, QLinear)):
            return None
        mods += [(m, m.prepared()) for m in (*a.qkv.mods, a.wo, *f.w13.mods, f.w2)]
        n1, n2 = blk.attention_norm.weight, blk.ffn_norm.weight
        norms += [(n, n._version) for n in (n1, n2)]
        layers.append((n1, a.qkv.p, a.wo.prepared(), n2, f.w13.p, f.w2.prepared()))
    backends = {m.backend for m, _ in mods}
    if len(backends) != 1:
        return None
    r = model.args
    stack = backends.pop().decode_stack(layers, r.n_heads, r.n_kv_heads, r.head_dim, r.norm_eps)
    return None if stack is None else FastDecode(model, stack, mods, norms)
