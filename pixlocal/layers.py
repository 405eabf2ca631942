"""Building blocks shared by the vision encoder and the text decoder (pure nn.Modules), and
torch's attention over a KV cache (the default attention op; a backend may supply its own)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Shapes: L tokens · D model dim · F hidden (MLP) dim · S attended positions · H heads
#         Hkv kv heads · Dh head dim


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int) -> torch.Tensor:
    """q (H, L, Dh) at positions S-L..S-1, k/v (Hkv, >= S, Dh) of which the first S positions
    are attended, causally → (H, L, Dh). Query head h reads KV head h // (H / Hkv)."""
    L = q.shape[1]
    k, v = k[:, :S], v[:, :S]
    if L == 1:
        mask, causal = None, False  # one new token sees everything before it
    elif S == L:
        mask, causal = None, True
    else:  # new tokens after a cached prefix: query i sees keys 0 .. S-L+i
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)
        causal = False
    # 4-D: torch's fused (flash) kernels take only batched inputs; 3-D ones ran the math
    # path, 3.5x slower (1064 tokens, 32/8 heads, bfloat16, 2 cores: 344 vs 99 ms a layer)
    return F.scaled_dot_product_attention(q[None], k.type_as(q)[None], v.type_as(q)[None],
                                          attn_mask=mask, is_causal=causal,
                                          enable_gqa=True)[0]


class Projections:
    """Linear layers of `owner` that read one input, called one by one: `owner.<name>(x)` for
    each name (looked up per call, so a layer swapped in is used). The loader replaces it
    with one stacked call where the backend can (qlinear.Fused, the same contract)."""

    def __init__(self, owner: nn.Module, *names: str) -> None:
        self.owner, self.names = owner, names

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [getattr(self.owner, n)(x) for n in self.names]


class CastLinear(nn.Linear):
    """nn.Linear computing in its input's dtype: a weight kept narrower (the vision encoder's
    16-bit file weights when the model computes in float32, see loader) is cast per call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)


class RMSNorm(nn.Module):
    """Normalise in fp32, cast back, then scale: mistral-inference's order (SPEC §3.3)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SiLU-gated MLP: w2(silu(w1 x) * w3 x); w1 gate, w3 up, w2 down; no biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = CastLinear(dim, hidden_dim, bias=False)
        self.w2 = CastLinear(hidden_dim, dim, bias=False)
        self.w3 = CastLinear(dim, hidden_dim, bias=False)
        self.w13: Callable[[torch.Tensor], list[torch.Tensor]] = Projections(self, "w1", "w3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, D) -> (L, D)
        g, u = self.w13(x)
        return self.w2(F.silu(g) * u)
