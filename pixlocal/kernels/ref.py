"""Reference kernels: plain torch, float32, obviously right. The oracle every fast backend
(cpu.py numba, cuda.py) is tested against, with the same function names and signatures."""

from __future__ import annotations

import torch

from ..qformat import QTensor, dequantize

# Shapes: L tokens · K in-features · M out-features · G group size


def qmatmul(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x (L, K) @ dequantize(q).T → (L, M), computed in float32 on x's device."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    w = dequantize(q).to(x.device)  # (M, K) float32
    return x.float() @ w.T  # (L, M)
