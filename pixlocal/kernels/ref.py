"""Reference kernels: plain torch, float32, obviously right. The oracle every fast backend
(cpu.py numba, cuda.py) is tested against: each function here has a twin of the same name and
signature there. `prepare` is the identity: the reference reads the QTensor as stored."""

from __future__ import annotations

import torch

from ..qformat import QTensor, dequantize

# Shapes: L tokens · K in-features · M out-features · G group size · N = K // G


def prepare(q: QTensor) -> QTensor:
    """The weight as this backend computes with it: unchanged."""
    return q


def qmatmul(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x (L, K) @ dequantize(q).T → (L, M), computed in float32 on x's device."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    w = dequantize(q).to(x.device)  # (M, K) float32
    return x.float() @ w.T  # (L, M)


def quantize_activation(x: torch.Tensor, group_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (L, K) → a (L, K) int8, d (L, N) float32, asum (L, N) int32 with x ≈ a * d per group
    (d = absmax / 127, a = round(x / d), half to even; d = 0 for an all-zero group)."""
    L, K = x.shape
    xf = x.float().reshape(L, K // group_size, group_size)  # (L, N, G)
    d = xf.abs().amax(-1) / 127  # (L, N)
    a = torch.where(d[..., None] > 0, torch.round(xf / d[..., None]), 0).to(torch.int8)
    return a.reshape(L, K), d, a.sum(-1, dtype=torch.int32)


def gemv(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M) float32 with x first quantized per group to int8 (decode)."""
    a, d, _ = quantize_activation(x, q.spec.group_size)
    L, K = x.shape
    xq = (a.float().reshape(L, d.shape[1], -1) * d[..., None]).reshape(L, K)
    return xq @ dequantize(q).to(x.device).T


def dequantize_rows(q: QTensor, r0: int, r1: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows r0..r1-1 of the weight, dequantized (exact in float32, then rounded to dtype)."""
    rows = QTensor(q.qweight[r0:r1], q.scales[r0:r1],
                   None if q.zeros is None else q.zeros[r0:r1], (r1 - r0, q.shape[1]), q.spec)
    return dequantize(rows).to(dtype)


def prefill(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M): bfloat16 x times bfloat16 weights gives bfloat16, any other x
    is multiplied in float32 and gives float32."""
    if x.dtype == torch.bfloat16:
        return x @ dequantize(q, torch.bfloat16).to(x.device).T
    return qmatmul(x, q)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int
                     ) -> torch.Tensor:
    """One query token: q (H, 1, Dh), k/v (Hkv, capacity, Dh) a layer's cache whose first S
    positions are attended → (H, 1, Dh) in q's dtype. Query heads grouped per KV head, two
    float32 bmm's (torch's CPU SDPA with enable_gqa took 2.6 ms at S=640 and 68 ms at S=4096
    per layer for this, bf16, 32/8 heads; this 0.2 and 1.3 ms)."""
    H, _, Dh = q.shape
    Hkv = k.shape[0]
    qg = q.reshape(Hkv, H // Hkv, Dh).float()  # heads h of KV head h // (H / Hkv)
    s = torch.bmm(qg, k[:, :S].float().transpose(1, 2)).mul_(Dh ** -0.5)  # (Hkv, H/Hkv, S)
    o = torch.bmm(s.softmax(-1), v[:, :S].float())  # (Hkv, H / Hkv, Dh)
    return o.to(q.dtype).view(H, 1, Dh)
