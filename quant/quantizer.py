"""Quantizing a float weight into qformat's layout: quantize() (error-minimising search) and
quantize_ref() (round-to-nearest, its simple twin). The format is qformat's; this module imports
it, never the other way.

quantize() (spec.search, the default) picks each group's codes by search, in the spirit of
llama.cpp's make_qkx2_quants. int4: 4 candidate grids of 15 + d steps over [min(w, 0),
max(w, 0)], d ∈ _INT4_DELTAS; each is rounded, its (s, min) refit by least squares, s
rounded down and up to its two nearest codes, z refit for each; the (candidate, code) pair
with the least squared error (in closed form from the group's sums) wins, is rounded again,
refit once more, and the better of the two is kept. int8: 4 candidate scales absmax/(127+d),
each rounded and refit by least squares. All sums run in a fixed order, so the result does
not depend on chunking or thread count. quantize_ref() is plain round-to-nearest from the
group's range (int4) or absmax (int8): the simple twin, and the floor the search must beat.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pixlocal.errors import FormatError
from pixlocal.qformat import (
    F16_NORMAL,
    INT8_SCALE_DTYPE,
    SCALE_MAX,
    QTensor,
    QuantSpec,
    decode_scales,
    scale_code_floor,
)

# Shapes: K in-features · M out-features · G group size · R rows of one chunk · N groups per row
#         B groups of one chunk (as columns)

_CHUNK = 1 << 20  # weights per chunk: amortises torch's per-op overhead; ~40 MB of scratch
_INT4_TINY = 2.0**-16  # a nonzero int4 tensor whose group ranges all fall below is refused
_INT4_DELTAS = (-1.0, -0.5, 0.0, 0.45)  # candidate grids: 15 + d steps over [min, max]; d < 0.5
                                       # keeps q <= 15 without a clamp
_INT8_DELTAS = (-3.0, -2.0, -1.0, 0.0)  # candidate scales: absmax / (127 + d)
_Scratch = dict[str, torch.Tensor]  # big intermediates reused across chunks (below)


def _check(weight: torch.Tensor, spec: QuantSpec) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise FormatError(f"can only quantize a 2-D float weight, got {weight.dtype} "
                          f"{tuple(weight.shape)}")
    if weight.shape[1] % spec.group_size:
        raise FormatError(f"in-features K={weight.shape[1]} is not a multiple of the group size "
                          f"{spec.group_size} ({spec.name}); use a group size that divides K")


def _quantize(weight: torch.Tensor, spec: QuantSpec, search: bool,
              int8_scale_dtype: torch.dtype = INT8_SCALE_DTYPE) -> QTensor:
    _check(weight, spec)
    M, K = weight.shape
    G = spec.group_size
    N = K // G
    R = max(1, _CHUNK // K)
    out = {s: torch.empty(shape, dtype=dt)
           for s, dt, shape in spec.layout((M, K), int8_scale_dtype)}
    qweight, scales, zeros = out["qweight"], out["scales"], out.get("zeros")
    ws: _Scratch = {}
    top = 0.0  # largest int4 group range
    for r0 in range(0, M, R):
        rows = weight[r0:r0 + R].detach().to("cpu")
        n = rows.shape[0]
        wt = scratch(ws, "w", (G, n * N)).copy_(rows.reshape(n * N, G).t())  # (G, B) float32
        try:
            if spec.bits == 4:
                q, key, t = int4_groups(wt, search, ws)
            else:
                q, s, fits_f16 = int8_groups(wt, search, scales.dtype, ws)
        except FormatError as e:
            raise FormatError(f"weight {tuple(weight.shape)} rows {r0}..{r0 + n - 1} {e}; "
                              f"refusing to quantize it as {spec.name}") from None
        if spec.bits == 4:
            packed = torch.add(q[:G // 2], q[G // 2:], alpha=16)  # (G/2, B): col j | col j+G/2
            qweight[r0:r0 + R] = packed.t().reshape(n, K // 2)
            c = (key * (1 / 256)).floor_()
            scales[r0:r0 + R] = c.view(n, N)
            zeros[r0:r0 + R] = (key - 256 * c).view(n, N)  # type: ignore[index]
            top = max(top, t)
            continue
        if scales.dtype == INT8_SCALE_DTYPE and not fits_f16:
            return _quantize(weight, spec, search, torch.bfloat16)  # fp16 would lose scales
        qweight[r0:r0 + R] = q.t().reshape(n, K)
        scales[r0:r0 + R] = s.view(n, N)
    if 0 < top < _INT4_TINY:
        raise FormatError(f"weight {tuple(weight.shape)} spans at most {top:.3g} per group, "
                          f"below int4's scale range (needs >= {_INT4_TINY:.3g} somewhere); keep "
                          "this tensor in bf16 or use int8")
    return QTensor(qweight, scales, zeros, (M, K), spec)


def quantize(weight: torch.Tensor, spec: QuantSpec,
             int8_scales: torch.dtype | None = None) -> QTensor:
    """Quantize an (M, K) float weight (any float dtype, any device; work is done on CPU in
    float32, chunk by chunk of rows). Uses the error-minimising search if `spec.search`.
    `int8_scales=torch.bfloat16` forces bfloat16 int8 scales (a caller quantizing one tensor
    in several row blocks needs one dtype for all of them); the default picks float16 unless
    a scale leaves its normal range.

    Raises FormatError if K % G != 0, if the weight has NaN/inf, or if its values leave the
    scheme's scale range.
    """
    return _quantize(weight, spec, spec.search, int8_scales or INT8_SCALE_DTYPE)


def quantize_ref(weight: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Plain round-to-nearest: scale from the group's [min(w, 0), max(w, 0)] range (int4, scale
    rounded up to its code) or absmax / 127 (int8). Same layout and checks as quantize()."""
    return _quantize(weight, replace(spec, search=False), False)


# The search works on one chunk of rows at a time with groups as columns, wt (G, B) for the
# chunk's B groups: per-group sums are then reductions over the outer dimension, which torch
# vectorises, and per-group values (B,) broadcast along rows. Big intermediates live in a
# scratch dict reused across chunks (fresh multi-MB tensors cost page faults every time);
# selection uses float arithmetic only (argmin over dim 0, where() and bool masks are an
# order of magnitude slower in torch on CPU).
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
    c0 = scale_code_floor(s)
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
        c = scale_code_floor(rng / 15)
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
    s_nz = s + (1 - torch.sign(s)) * F16_NORMAL[1]  # zero scales don't count
    fits_f16 = s_nz.min().item() >= F16_NORMAL[0] and s.max().item() <= F16_NORMAL[1]
    s = s.to(dtype)
    torch.mul(w, 1 / s.float().clamp(min=_TINY), out=q).round_().clamp_(-127, 127)
    return q, s, fits_f16
