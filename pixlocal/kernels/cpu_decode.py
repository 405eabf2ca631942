"""One decoder layer of a decode step in a single numba call (cpu backend).

A decode step through the nn.Modules costs ~100 small torch ops per layer (norms, rope,
casts, splits, residual adds) and as many Python calls around the 4 quantized matmuls: 8.8
of 74 ms per token on an 8-layer Nemo (2 threads, bench/README.md). `_layer` does the same
arithmetic, in the same order and with the same bfloat16 roundings as Block.forward in a
bfloat16 model (none in a float32 one), calling the gemv and decode-attention kernels
in between: the twin it is tested against is that module path (tests/test_cpu_decode.py).
Equality is up to float32 rounding inside torch's own ops (its vectorized exp and sums), so
an element of the bfloat16 residual may land one bfloat16 step away now and then.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from .cpu import _gemv
from .cpu_attn import PARALLEL_MIN, _attend, _attend_par, _np16
from .cpu_layout import CpuQ

# _layer's machine code embeds the kernels of cpu.py, cpu_attn.py and llir.py: jit.py keys
# numba's cache on every kernel source, so a change to any of them recompiles it.

# Shapes: D model dim · F hidden dim · H heads · Hkv kv heads · Dh head dim · S cached tokens


@njit(inline="always")
def _rb(v, bf):
    """float32 v rounded to bfloat16's precision (nearest even) where bf, as torch's casts."""
    if not bf or v != v:
        return np.float32(v)
    u = np.float32(v).view(np.uint32)
    u = np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                  & np.uint32(0xFFFF0000))
    return u.view(np.float32)


@njit(inline="always")
def _rmsnorm(h, w, eps, bf, out):
    """RMSNorm's order: normalise in float32, round to the model dtype, then scale."""
    D = h.shape[0]
    ss = 0.0  # float64: the float32 mean, not a float32 running sum's error
    for i in range(D):
        ss += np.float64(h[i]) * np.float64(h[i])
    rs = np.float32(1.0) / np.sqrt(np.float32(ss / D) + eps)
    for i in range(D):
        out[0, i] = _rb(_rb(h[i] * rs, bf) * w[i], bf)


@njit(inline="always")
def _mm(w, x, out):
    """out = x (1, K) @ W.T through the gemv kernel; w as _weight makes it."""
    _gemv(w[0], w[1], w[2], w[3], x, w[4], out)


@njit(inline="always")
def _rope(x, cs, bf):
    """Rotate x (heads, Dh) in place: pairs (x0, x1) times (cos, sin), as torch's complex
    multiply (two products, then their difference and sum)."""
    for hd in range(x.shape[0]):
        for p in range(x.shape[1] // 2):
            a, b, c, s = x[hd, 2 * p], x[hd, 2 * p + 1], cs[p, 0], cs[p, 1]
            x[hd, 2 * p] = _rb(a * c - b * s, bf)
            x[hd, 2 * p + 1] = _rb(a * s + b * c, bf)


@njit(cache=True)
def _layer(h, bf, eps, n1, n2, wqkv, wo, w13, w2, ck, cv, pos, cs, H, Hkv, Dh, par):
    """h (D,) float32, the residual stream (bfloat16 values where bf), updated in place by
    one decoder layer for the token at `pos`; its rotated key and value go to ck/cv[:, pos]
    (bfloat16 bits or float32, like the cache tensors)."""
    D = h.shape[0]
    x = np.empty((1, D), np.float32)
    _rmsnorm(h, n1, eps, bf, x)
    qkv = np.empty((1, wqkv[0].shape[0] * wqkv[5]), np.float32)
    _mm(wqkv, x, qkv)
    nq, nk = H * Dh, Hkv * Dh
    q = np.empty((H, Dh), np.float32)
    k = np.empty((Hkv, Dh), np.float32)
    for i in range(nq):
        q[i // Dh, i % Dh] = _rb(qkv[0, i], bf)
    for i in range(nk):
        k[i // Dh, i % Dh] = _rb(qkv[0, nq + i], bf)
    _rope(q, cs, bf)
    _rope(k, cs, bf)
    for j in range(Hkv):
        for d in range(Dh):
            v = _rb(qkv[0, nq + nk + j * Dh + d], bf)
            if bf:  # bfloat16 bits: the values are already rounded
                ck[j, pos, d] = np.uint16(np.float32(k[j, d]).view(np.uint32) >> np.uint32(16))
                cv[j, pos, d] = np.uint16(np.float32(v).view(np.uint32) >> np.uint32(16))
            else:
                ck[j, pos, d] = k[j, d]
                cv[j, pos, d] = v
    o = np.empty((H, Dh), np.float32)
    scale = np.float32(Dh ** -0.5)
    if par:
        _attend_par(q, ck, cv, pos + 1, scale, o)
    else:
        _attend(q, ck, cv, pos + 1, scale, o)
    of = o.reshape(1, nq)
    for i in range(nq):
        of[0, i] = _rb(of[0, i], bf)
    y = np.empty((1, wo[0].shape[0] * wo[5]), np.float32)
    _mm(wo, of, y)
    for i in range(D):
        h[i] = _rb(h[i] + _rb(y[0, i], bf), bf)
    _rmsnorm(h, n2, eps, bf, x)
    gu = np.empty((1, w13[0].shape[0] * w13[5]), np.float32)
    _mm(w13, x, gu)
    F = w2[6]
    m = np.empty((1, F), np.float32)
    for i in range(F):
        g, u = _rb(gu[0, i], bf), _rb(gu[0, F + i], bf)
        m[0, i] = _rb(_rb(g / (np.float32(1.0) + np.exp(-g)), bf) * u, bf)
    y2 = np.empty((1, w2[0].shape[0] * w2[5]), np.float32)
    _mm(w2, m, y2)
    for i in range(D):
        h[i] = _rb(h[i] + _rb(y2[0, i], bf), bf)


def _weight(p: CpuQ) -> tuple:
    """A prepared weight as _layer reads it (qweight, sz, int4, bf16 scales, G, rows, K)."""
    return (p.qweight, p.sz, p.spec.bits == 4, p.bf16, p.spec.group_size, p.rows, p.shape[1])


class DecodeStack:
    """The decoder layers' weights as _layer reads them: per layer (attention_norm weight,
    wq/wk/wv stacked, wo, ffn_norm weight, w1/w3 stacked, w2), the stacks as cpu_layout.fuse
    makes them. Calling it runs one token through every layer."""

    def __init__(self, layers: list[tuple[torch.Tensor, CpuQ, CpuQ, torch.Tensor, CpuQ, CpuQ]],
                 n_heads: int, n_kv_heads: int, head_dim: int, eps: float) -> None:
        self.layers = [(n1.detach().float().numpy().copy(), _weight(qkv), _weight(wo),
                        n2.detach().float().numpy().copy(), _weight(w13), _weight(w2))
                       for n1, qkv, wo, n2, w13, w2 in layers]
        self.H, self.Hkv, self.Dh = n_heads, n_kv_heads, head_dim
        self.eps = np.float32(eps)

    def __call__(self, h: torch.Tensor, pos: int, ks: list[torch.Tensor],
                 vs: list[torch.Tensor], freqs_cis: torch.Tensor) -> torch.Tensor:
        """h (1, D) bfloat16 or float32 at position pos → (1, D) after every layer; ks/vs the
        layers' caches (Hkv, capacity, Dh) in h's dtype; freqs_cis (1, Dh/2) complex64."""
        if not all(k.shape[1] > pos and k.dtype == h.dtype for k in ks + vs):
            raise ValueError(f"position {pos} is past a cache of {ks[0].shape[1]} positions, or "
                             f"the cache is not {h.dtype}")
        bf = h.dtype == torch.bfloat16
        x = h.float().reshape(-1).numpy().copy()
        cs = torch.view_as_real(freqs_cis.reshape(-1)).numpy()  # (Dh/2, 2)
        par = self.Hkv * (pos + 1) * self.Dh >= PARALLEL_MIN
        for (n1, wqkv, wo, n2, w13, w2), k, v in zip(self.layers, ks, vs, strict=True):
            _layer(x, bf, self.eps, n1, n2, wqkv, wo, w13, w2, _np16(k), _np16(v), pos, cs,
                   self.H, self.Hkv, self.Dh, par)
        return torch.from_numpy(x).to(h.dtype).reshape(1, -1)
