"""Building blocks shared by the vision encoder and the text decoder (pure nn.Modules)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Shapes: L tokens · D model dim · F hidden (MLP) dim


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
        self.w13: Callable[[torch.Tensor], list[torch.Tensor]] | None = None  # w1, w3 fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (L, D) -> (L, D)
        g, u = self.w13(x) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(g) * u)
