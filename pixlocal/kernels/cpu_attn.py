"""Decode attention for the cpu backend (numba): one query token against the cached keys and
values, each read once in its stored dtype (bfloat16 bits or float32) and accumulated in
float32. torch's way (ref.decode_attention) converts the whole cache to float32 for every
layer and token, then runs two small bmm's whose thread launch alone costs 50-100 us on a
2-core VM: 0.35-2 ms per layer at 600 cached tokens, against ~0.1 ms here (bench/README.md).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

# Shapes: H query heads · Hkv kv heads · S cached tokens · Dh head dim

# cached elements (Hkv * S * Dh) from which the KV heads run on threads (Nemo: S >= 512):
# 8 x 128 heads, 2 threads: serial 172/329/681 us at S = 300/600/1200, threaded 182/231/431
PARALLEL_MIN = 1 << 19


def _to_f32(v):  # noqa: ANN001, ANN202
    """A cache element as float32: uint16 bfloat16 bits, or a float. In Python as written;
    in jitted code through the overload below, chosen by v's type at compile time."""
    if isinstance(v, np.uint16):
        return np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
    return np.float32(v)


@overload(_to_f32, inline="always")
def _to_f32_impl(v):  # noqa: ANN001, ANN202
    if v == types.uint16:  # bfloat16 bits
        return lambda v: np.uint32(np.uint32(v) << np.uint32(16)).view(np.float32)
    return lambda v: np.float32(v)


@njit(inline="always")
def _head_group(q, k, v, S, scale, kh, out):
    """Query heads kh*grp .. kh*grp+grp-1 (they share KV head kh) → out rows."""
    Dh, grp = q.shape[1], q.shape[0] // k.shape[0]
    h0 = kh * grp
    s = np.empty((grp, S), np.float32)
    row = np.empty(Dh, np.float32)
    for t in range(S):
        for d in range(Dh):
            row[d] = _to_f32(k[kh, t, d])
        for g in range(grp):
            acc = np.float32(0.0)
            for d in range(Dh):
                acc += q[h0 + g, d] * row[d]
            s[g, t] = acc * scale
    for g in range(grp):
        m = s[g].max()
        tot = np.float32(0.0)
        for t in range(S):
            e = np.exp(s[g, t] - m)
            s[g, t] = e
            tot += e
        s[g] *= np.float32(1.0) / tot
        out[h0 + g] = 0.0
    for t in range(S):
        for d in range(Dh):
            row[d] = _to_f32(v[kh, t, d])
        for g in range(grp):
            p = s[g, t]
            for d in range(Dh):
                out[h0 + g, d] += p * row[d]


_FM = {"reassoc", "contract", "nsz", "arcp"}  # lets LLVM vectorize the float reductions


@njit(cache=True, fastmath=_FM)
def _attend(q, k, v, S, scale, out):
    for kh in range(k.shape[0]):
        _head_group(q, k, v, S, scale, kh, out)


@njit(parallel=True, cache=True, fastmath=_FM)
def _attend_par(q, k, v, S, scale, out):
    for kh in prange(k.shape[0]):
        _head_group(q, k, v, S, scale, kh, out)


def _np16(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else \
        t.float().numpy()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: int
                     ) -> torch.Tensor:
    """q (H, 1, Dh), k/v (Hkv, capacity, Dh) the layer's whole cache, of which the first S
    positions are attended → (H, 1, Dh) in q's dtype: softmax(q k[:S]^T / sqrt(Dh)) v[:S],
    query heads grouped per KV head."""
    H, _, Dh = q.shape
    Hkv = k.shape[0]
    qf = q.reshape(H, Dh).float().contiguous().numpy()
    out = np.empty((H, Dh), np.float32)
    run = _attend_par if Hkv * S * Dh >= PARALLEL_MIN else _attend
    run(qf, _np16(k), _np16(v), S, np.float32(Dh ** -0.5), out)
    return torch.from_numpy(out).to(q.dtype).view(H, 1, Dh)
