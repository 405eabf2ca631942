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

      one token        no mask, and the H / Hkv query heads of a KV head as that head's
                       query rows (one token sees every key, so no mask tells them apart):
                       no GQA flag and no repeated K/V, which every fused kernel takes
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
    if L == 1:  # (1, Hkv, H / Hkv, Dh): head h is row h % (H / Hkv) of KV head h // (H / Hkv)
        o = F.scaled_dot_product_attention(qd.reshape(1, Hkv, H // Hkv, Dh), kd[None],
                                           vd[None])
        return o.reshape(H, 1, Dh).to(q.dtype)
    if Hkv != H:  # head h reads KV head h // (H / Hkv)
        kd, vd = kd.repeat_interleave(H // Hkv, 0), vd.repeat_interleave(H // Hkv, 0)
    if S == L:
        o = F.scaled_dot_product_attention(qd[None], kd[None], vd[None], is_causal=True)
    else:
        o = F.scaled_dot_product_attention(qd[None], kd[None], vd[None],
                                           attn_mask=causal_lower_right(L, S))
    return o[0].to(q.dtype)
