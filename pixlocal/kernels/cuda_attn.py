"""The cuda backend's attention: layers.attention's contract in the call shapes torch's fused
CUDA kernels (flash, memory-efficient) take, in float16 below compute capability 8.0.
Plain torch, so it runs on the CPU too, where the tests check its calls and its numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cuda

# Shapes: H heads · Hkv kv heads · L new tokens · S attended positions · Dh head dim


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int) -> torch.Tensor:
    """layers.attention's contract (q (H, L, Dh) at positions S-L..S-1, k/v (Hkv, >= S, Dh),
    causal → (H, L, Dh) in q's dtype) in call shapes torch's fused CUDA kernels take:

      one token        no mask, enable_gqa (flash reads the grouped heads as they are)
      L new tokens     k/v repeated to H heads (memory-efficient attention has no GQA) and
                       is_causal (S == L), or after a cached prefix the lower-right causal
                       bias (query i sees keys 0..S-L+i), which flash and memory-efficient
                       attention apply without a mask tensor; an explicit bool mask with
                       enable_gqa leaves torch only its math kernel and an (H, L, S) fp32
                       score matrix

    Below capability 8.0 it computes in float16 (to_dtype: clamped), bf16 being emulated or
    missing there."""
    from torch.nn.attention.bias import causal_lower_right

    H, L, Dh = q.shape
    Hkv = k.shape[0]
    dt = cuda.compute_dtype(q.dtype, cuda.capability(q.device))
    qd, kd, vd = (cuda.to_dtype(t, dt) for t in (q, k[:, :S], v[:, :S]))
    if L == 1:
        o = F.scaled_dot_product_attention(qd[None], kd[None], vd[None], enable_gqa=Hkv != H)
    else:
        if Hkv != H:  # head h reads KV head h // (H / Hkv)
            kd, vd = kd.repeat_interleave(H // Hkv, 0), vd.repeat_interleave(H // Hkv, 0)
        if S == L:
            o = F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True)
        else:
            o = F.scaled_dot_product_attention(qd[None], kd[None], vd[None],
                                               attn_mask=causal_lower_right(L, S))
    return o[0].to(q.dtype)
