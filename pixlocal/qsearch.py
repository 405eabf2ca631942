"""The error-minimising group search behind qformat.quantize (see qformat's docstring for
the format and the algorithm). Works on one chunk of rows at a time, groups as columns."""

from __future__ import annotations

import torch

from .errors import FormatError
from .qformat import (
    _F16_NORMAL,
    _INT4_DELTAS,
    _INT8_DELTAS,
    SCALE_MAX,
    _scale_code_floor,
    decode_scales,
)

# The search works on one chunk of rows at a time with groups as columns, wt (G, B) for the
# chunk's B groups: per-group sums are then reductions over the outer dimension, which torch
# vectorises, and per-group values (B,) broadcast along rows. Big intermediates live in a
# scratch dict reused across chunks (fresh multi-MB tensors cost page faults every time);
# selection uses float arithmetic only (argmin over dim 0, where() and bool masks are an
# order of magnitude slower in torch on CPU).
_Scratch = dict[str, torch.Tensor]
_TINY = torch.finfo(torch.float32).tiny  # 1/s stays finite; a larger floor rounds tiny groups


def scratch(ws: _Scratch, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    key = f"{name}{tuple(shape)}"
    if key not in ws:
        ws[key] = torch.empty(shape)
    return ws[key]


def _gsum(a: torch.Tensor, b: torch.Tensor | None, half: torch.Tensor) -> torch.Tensor:
    """Σ_g a (b=None) or Σ_g a·b over the group dimension, (..., G, B) → (..., B), summed in a
    fixed pairwise order (so results do not depend on chunking or thread count) in the
    scratch `half` (..., G/2, B). The result is a view into `half`."""
    h = a.shape[-2] // 2
    if b is None:
        torch.add(a[..., :h, :], a[..., h:, :], out=half)
    else:
        torch.mul(a[..., :h, :], b[..., :h, :], out=half).addcmul_(a[..., h:, :], b[..., h:, :])
    while h > 1:
        h //= 2
        half[..., :h, :] += half[..., h:2 * h, :]
    return half[..., 0, :]


def _pick(e: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Per column, the key of the row with the least e (ties: the largest key); (P, B) → (B,).
    Keys are exact integers in float32."""
    hit = torch.eq(e, e.amin(0), out=torch.empty_like(e))  # 1.0 where minimal
    return hit.mul_(key + 1).amax(0) - 1


def _int4_fit(q: torch.Tensor, w: torch.Tensor, sw: torch.Tensor, rng: torch.Tensor,
              ws: _Scratch) -> tuple[torch.Tensor, torch.Tensor]:
    """For roundings q (..., G, B) of wt (G, B): the least-squares (s, min), with s rounded down
    and up to its codes and the best zero point for each → keys 256 * scale code + zero code,
    and the closed-form ||s (q - z) - w||² - ||w||², each (2, ..., B), float32."""
    G = w.shape[0]
    half = scratch(ws, "half", q.shape[:-2] + (G // 2, q.shape[-1]))
    sq = _gsum(q, None, half).clone()
    sqq = _gsum(q, q, half).clone()
    sqw = _gsum(q, w, half)
    det = G * sqq - sq * sq  # an exact integer >= 0; 0 iff q is constant
    flat = 1 - det.clamp(max=1)  # 1.0 where det == 0: fall back to s = range / 15
    s = (G * sqw - sq * sw) / det.clamp(min=1) + flat * rng / 15  # least squares
    c0 = _scale_code_floor(s)
    c = torch.stack([c0, (c0 + 1).clamp_(max=255)])  # (2, ..., B) int32
    sr = decode_scales(c)
    z = ((sr * sq - sw) * (16 / G) / sr).round_().clamp_(0, 255)  # least-squares min for sr
    m = sr * z * (-1 / 16)
    e = sr * (sr * sqq - 2 * sqw) + m * (2 * sr * sq + G * m - 2 * sw)
    return c * 256 + z, e


def _int4_round(w: torch.Tensor, key: torch.Tensor, ws: _Scratch, out: str,
                err: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round wt (G, B) against keys (B,) → q (G, B) (in ws[out]) and, if `err`, the squared
    error per group (B,)."""
    c = (key * (1 / 256)).floor_()
    s = decode_scales(c)
    t, q = scratch(ws, "round", w.shape), scratch(ws, out, w.shape)
    torch.addcmul((key - 256 * c) / 16, w, 1 / s, out=t)  # w / s + z
    torch.round(t, out=q).clamp_(0, 15)
    if not err:
        return q, None
    t -= q
    return q, _gsum(t, t, scratch(ws, "half", (w.shape[0] // 2, w.shape[1]))) * s * s


def int4_groups(w: torch.Tensor, search: bool,
                 ws: _Scratch) -> tuple[torch.Tensor, torch.Tensor, float]:
    """wt (G, B) float32 → q (G, B) float32, keys 256 * scale code + zero code (B,) float32,
    and the largest group range."""
    G, B = w.shape
    lo = w.amin(0).clamp_(max=0)  # (B,); the grid must contain 0
    rng = w.amax(0).clamp_(min=0) - lo
    top = rng.max().item()
    if not top <= 15 * SCALE_MAX:  # NaN fails this too
        raise FormatError("has NaN or inf" if top != top or top == float("inf") else
                          f"has a group spanning {top:.3g}, beyond int4's scale range "
                          f"(s <= {SCALE_MAX}); keep this tensor in bf16 or use int8")
    if not search:
        c = _scale_code_floor(rng / 15)
        c = (c + (decode_scales(c) < rng / 15).int()).clamp_(max=255)  # round up: range fits
        key = c * 256 + (-lo / decode_scales(c) * 16).round_().clamp_(0, 255)
        return _int4_round(w, key, ws, "q", err=False)[0], key, top
    # candidates: (15 + d) steps over [lo, hi], each refit by least squares (make_qkx2-like)
    D = len(_INT4_DELTAS)
    a = torch.tensor([15 + d for d in _INT4_DELTAS]).view(D, 1, 1) / rng.clamp(min=1e-30)
    q = torch.addcmul(-lo * a, w, a, out=scratch(ws, "cand", (D, G, B))).round_()  # (D, G, B)
    sw = _gsum(w, None, scratch(ws, "half", (G // 2, B))).clone()
    key, e = _int4_fit(q, w, sw, rng, ws)  # (2, D, B)
    key = _pick(e.view(2 * D, B), key.view(2 * D, B))
    q, e1 = _int4_round(w, key, ws, "q1")
    # one refinement: refit on the chosen rounding; its closed-form error (before re-rounding)
    # bounds the error after, so it is comparable with e1
    key2, e2 = _int4_fit(q, w, sw, rng, ws)  # (2, B)
    assert e1 is not None
    e2 += _gsum(w, w, scratch(ws, "half", (G // 2, B)))
    key = _pick(torch.cat([e1[None], e2]), torch.cat([key[None], key2]))
    return _int4_round(w, key, ws, "q", err=False)[0], key, top


def int8_groups(w: torch.Tensor, search: bool, dtype: torch.dtype,
                 ws: _Scratch) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """wt (G, B) float32 → q (G, B) float32, scales (B,) in `dtype`, and whether every scale is
    zero or inside float16's normal range."""
    G, B = w.shape
    q = scratch(ws, "q", (G, B))
    amax = torch.abs(w, out=q).amax(0)  # (B,)
    top = amax.max().item()
    if top != top or top == float("inf"):
        raise FormatError("has NaN or inf")
    s = amax / 127
    if search:  # candidates absmax / (127 + d), each refit by least squares
        D = len(_INT8_DELTAS)
        a = torch.tensor([127 + d for d in _INT8_DELTAS]).view(D, 1, 1) / amax.clamp(min=1e-30)
        qd, half = scratch(ws, "cand", (D, G, B)), scratch(ws, "half", (D, G // 2, B))
        torch.mul(w, a, out=qd).round_().clamp_(-127, 127)  # (D, G, B)
        sqq = _gsum(qd, qd, half).clamp(min=1)  # (D, B)
        sqw = _gsum(qd, w, half)
        d = _pick(-sqw * sqw / sqq, torch.arange(D, dtype=torch.float32)[:, None].expand(D, B))
        s = (sqw / sqq).gather(0, d.long()[None])[0]  # least squares for the best rounding
    s_nz = s + (1 - torch.sign(s)) * _F16_NORMAL[1]  # zero scales don't count
    fits_f16 = s_nz.min().item() >= _F16_NORMAL[0] and s.max().item() <= _F16_NORMAL[1]
    s = s.to(dtype)
    torch.mul(w, 1 / s.float().clamp(min=_TINY), out=q).round_().clamp_(-127, 127)
    return q, s, fits_f16




def new_scratch() -> _Scratch:
    return {}
