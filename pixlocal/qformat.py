"""pixlocal's quantized weight format: the contract between quant/ and the runtime.

A quantized (M, K) weight (M out-features, K in-features, nn.Linear's layout) is stored as a
struct of arrays, quantized in groups of G consecutive input columns of one row
(group g of row m = columns [g*G, (g+1)*G)). G is 32, 64 or 128 and K % G == 0 is required
(never padded). Layouts are device-neutral: a backend may repack at load time, a file never
holds a CPU-ISA-specific layout.

int4-g{G}  asymmetric, 8-bit scale + 8-bit zero point per group            (default: int4-g32)
  {name}.qweight  uint8  (M, K // 2)  q ∈ [0, 15]; within each group, byte j (0 <= j < G/2,
                                      at column g*G/2 + j of the row) holds column j of the
                                      group in its low nibble and column j + G/2 in its high
                                      nibble (ggml's q4_0 order: one 16-byte load, & 0x0F and
                                      >> 4, gives two runs of contiguous columns)
  {name}.scales   uint8  (M, K // G)  s, an unsigned 8-bit float "e5m3": c = e << 3 | f,
                                      s = (1 + f/8) * 2^(e - 26); 2^-26 ≈ 1.5e-8 (c=0) ... 60
                                      (c=255); no zero, inf or NaN
  {name}.zeros    uint8  (M, K // G)  z = c / 16 ∈ [0, 15.9375], the zero point in steps of s
  w ≈ s * (q - z)        (min = -s*z <= 0: as in ggml's K-quants the grid's span reaches 0)
  bits/weight = 4 + 16/G                  (G=32 → 4.5, G=64 → 4.25, G=128 → 4.125)

int8-g{G}  symmetric
  {name}.qweight  int8   (M, K)       q ∈ [-127, 127] (-128 unused: SIMD sign tricks stay safe)
  {name}.scales   float16 (M, K // G) s; bfloat16 for a tensor whose scales leave float16's
                                      normal range [2^-14, 65504] (the dtype is in the file)
  w ≈ s * q
  bits/weight = 8 + 16/G                  (G=32 → 8.5, G=64 → 8.25, G=128 → 8.125)

Dequantization is exact in float32 for both schemes (s has 4 significant bits and q - z at
most 9 for int4; an fp16 s has 11 and q 8 for int8), so every backend agrees on the weights
bit for bit; w = s*q + min with min = -s*z gives the same floats.

Rounding is round-half-to-even. q is always rounded against the *stored* (already rounded)
scale and zero point, so their coarse encodings cost little: the 3-bit scale mantissa with a
1/16-step zero point costs ~2.5% RMS against float32 scale and min (MiniLM-L6 weights).

Why 8-bit scale and zero for int4: at 4.5 bits/weight the budget is 16 bits per 32 weights.
Spent on an fp16 scale (symmetric g32) or on fp16 scale + fp16 min (asymmetric g64), even an
exhaustive search reaches only ~0.95x llama.cpp Q4_0's RMS error on MiniLM-L6's weights;
spent on an asymmetric g32 group with 8-bit scale and zero codes, this module's search
reaches 0.835x (0.80x is the ceiling with float32 scale and min, at 5 bits/weight).

quantize() (spec.search, the default) picks each group's codes by search, in the spirit of
llama.cpp's make_qkx2_quants. int4: 4 candidate grids of 15 + d steps over [min(w, 0),
max(w, 0)], d ∈ _INT4_DELTAS; each is rounded, its (s, min) refit by least squares, s
rounded down and up to its two nearest codes, z refit for each; the (candidate, code) pair
with the least squared error (in closed form from the group's sums) wins, is rounded again,
refit once more, and the better of the two is kept. int8: 4 candidate scales absmax/(127+d),
each rounded and refit by least squares. All sums run in a fixed order, so the result does
not depend on chunking or thread count. quantize_ref() is plain round-to-nearest from the
group's range (int4) or absmax (int8): the simple twin, and the floor the search must beat.

A model dir (written by `pixlocal quantize`, read by checkpoint.py): params.json, tekken.json,
quantized-NNNNN-of-NNNNN.safetensors and quantized.index.json = {"metadata": {...as below,
"total_size"}, "shards": {file: {"size", "sha256"}}, "weight_map": {tensor: file}}. Every
shard's __metadata__: {"format": "pixlocal", "format_version": "1", "quant": "<default spec
name>", "group_size": "<its G>", "source": "<sha256 of the source params.json/config.json>"}.
Weight `{m}.weight` quantized is stored as `{m}.qweight/.scales[/.zeros]` (a tensor is quantized
iff "{m}.scales" is present; its scheme is read from its own tensors, QTensor.from_tensors, so
a file mixes schemes); other tensors keep their names. Any layout change bumps FORMAT_VERSION.

The search itself lives in qsearch.py (pixlocal/ never imports quant/, and the runtime's
QLinear.from_linear quantizes too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from .errors import FormatError

# Shapes: K in-features · M out-features · G group size · R rows of one chunk · N groups per row

FORMAT_NAME = "pixlocal"
FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128)
_DEFAULT_GROUP = {4: 32, 8: 32}

_E5M3_BIAS = 26  # s = (1 + f/8) * 2^(e - 26)
SCALE_MIN = 2.0**-26  # e5m3 code 0
SCALE_MAX = 1.875 * 2.0**5  # e5m3 code 255 = 60.0
_INT4_TINY = 2.0**-16  # a nonzero int4 tensor whose group ranges all fall below is refused
_F16_NORMAL = (2.0**-14, 65504.0)
_CHUNK = 1 << 20  # weights per chunk: amortises torch's per-op overhead; ~40 MB of scratch
_INT4_DELTAS = (-1.0, -0.5, 0.0, 0.45)  # candidate grids: 15 + d steps over [min, max]; d < 0.5
                                       # keeps q <= 15 without a clamp
_INT8_DELTAS = (-3.0, -2.0, -1.0, 0.0)  # candidate scales: absmax / (127 + d)


@dataclass(frozen=True)
class QuantSpec:
    """One quantization scheme: bits (4 or 8) and group size G (32, 64 or 128).

    `search` chooses the algorithm (error-minimising search or plain round-to-nearest); it
    does not change the layout, so it is not part of `name`.
    """

    bits: int
    group_size: int
    search: bool = True

    def __post_init__(self) -> None:
        if self.bits not in _DEFAULT_GROUP or self.group_size not in GROUP_SIZES:
            raise FormatError(f"unsupported quantization int{self.bits}-g{self.group_size}: "
                              f"bits must be 4 or 8 and group size one of {GROUP_SIZES}")

    @property
    def name(self) -> str:
        return f"int{self.bits}-g{self.group_size}"

    @property
    def asymmetric(self) -> bool:
        return self.bits == 4

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 16 / self.group_size

    @classmethod
    def default(cls, bits: int = 4) -> QuantSpec:
        """The recommended scheme for `bits`: int4-g32 (4.5 bits/weight), int8-g32 (8.5)."""
        if bits not in _DEFAULT_GROUP:
            raise FormatError(f"unsupported quantization bits {bits}: use 4 or 8")
        return cls(bits, _DEFAULT_GROUP[bits])

    @classmethod
    def parse(cls, text: str) -> QuantSpec:
        """"int4-g64" → QuantSpec(4, 64); "int8" → QuantSpec.default(8)."""
        m = re.fullmatch(r"int(\d+)(?:-g(\d+))?", text.strip().lower())
        if m is None:
            raise FormatError(f"unknown quantization {text!r}: expected e.g. 'int4-g32', "
                              "'int8-g64'")
        if m[2] is None:
            return cls.default(int(m[1]))
        return cls(int(m[1]), int(m[2]))


@dataclass
class QTensor:
    """A quantized (M, K) weight: the tensors of one row of the table in the module docstring."""

    qweight: torch.Tensor  # int4: uint8 (M, K // 2) · int8: int8 (M, K)
    scales: torch.Tensor  # int4: uint8 e5m3 codes (M, K // G) · int8: float16/bfloat16 (M, K // G)
    zeros: torch.Tensor | None  # int4: uint8 (M, K // G), z * 16 · int8: None
    shape: tuple[int, int]  # (M, K)
    spec: QuantSpec

    @property
    def bits_per_weight(self) -> float:
        """Actual storage, scales and zero points included."""
        ts = [self.qweight, self.scales] + ([] if self.zeros is None else [self.zeros])
        return 8 * sum(t.numel() * t.element_size() for t in ts) / (self.shape[0] * self.shape[1])

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of this weight, named `{name}.qweight` etc."""
        out = {f"{name}.qweight": self.qweight, f"{name}.scales": self.scales}
        if self.zeros is not None:
            out[f"{name}.zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor],
                     spec: QuantSpec | None = None) -> QTensor:
        """Rebuild from `{name}.*` entries; the scheme is read from the tensors themselves and,
        if `spec` is given, must agree with it (group size and bits). Raises FormatError."""
        try:
            qweight, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
        except KeyError as e:
            raise FormatError(f"{name}: quantized weight lacks {e.args[0]}") from None
        zeros = tensors[f"{name}.zeros"] if f"{name}.zeros" in tensors else None
        bits = 4 if qweight.dtype == torch.uint8 else 8 if qweight.dtype == torch.int8 else 0
        if bits == 0 or qweight.dim() != 2 or scales.dim() != 2 or scales.shape[1] == 0:
            raise FormatError(f"{name}: qweight {qweight.dtype} {tuple(qweight.shape)} / scales "
                              f"{tuple(scales.shape)} is not a pixlocal int4 or int8 weight")
        M, K = qweight.shape[0], qweight.shape[1] * (2 if bits == 4 else 1)
        G = K // scales.shape[1]
        found = QuantSpec(bits, G) if G in GROUP_SIZES else None
        want_scale = (torch.uint8,) if bits == 4 else (torch.float16, torch.bfloat16)
        ok = (found is not None and scales.shape == (M, K // G) and scales.dtype in want_scale
              and (zeros is None) == (bits == 8)
              and (zeros is None or (zeros.shape == scales.shape and zeros.dtype == torch.uint8)))
        if not ok:
            raise FormatError(f"{name}: inconsistent quantized tensors (qweight {qweight.dtype} "
                              f"{tuple(qweight.shape)}, scales {scales.dtype} "
                              f"{tuple(scales.shape)}, zeros "
                              f"{None if zeros is None else (zeros.dtype, tuple(zeros.shape))})")
        assert found is not None
        if spec is not None and (spec.bits, spec.group_size) != (bits, G):
            raise FormatError(f"{name}: stored as {found.name}, expected {spec.name}")
        return cls(qweight, scales, zeros, (M, K), spec or found)


def make_metadata(spec: QuantSpec, source: str) -> dict[str, str]:
    """The safetensors `__metadata__` of a quantized shard; `source` is the sha256 of the
    source checkpoint's params.json."""
    return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "quant": spec.name,
            "source": source}


def read_metadata(metadata: Mapping[str, str] | None, where: str = "") -> QuantSpec:
    """Check a shard's `__metadata__` and return its (default) scheme; FormatError if it is
    not a pixlocal shard or was written by another format version."""
    md = metadata or {}
    if md.get("format") != FORMAT_NAME:
        raise FormatError(f"{where}: not a pixlocal quantized shard (format="
                          f"{md.get('format')!r})")
    if md.get("format_version") != str(FORMAT_VERSION):
        raise FormatError(f"{where}: quantized with pixlocal format_version "
                          f"{md.get('format_version')}, this pixlocal reads {FORMAT_VERSION}: "
                          "re-quantize the original checkpoint with `pixlocal quantize`")
    return QuantSpec.parse(md.get("quant", ""))


# ---- int4 pieces: e5m3 scale codes and nibble packing --------------------------------------

def decode_scales(codes: torch.Tensor) -> torch.Tensor:
    """e5m3 codes (uint8 or int32, any shape) → float32 scales: (1 + f/8) * 2^(e - 26).

    c = e << 3 | f is the float32 bit pattern shifted down by 20 with the exponent bias
    changed from 127 to 26: so s's bits are (c + 8 * (127 - 26)) << 20, exactly."""
    return ((codes.to(torch.int32) + 8 * (127 - _E5M3_BIAS)) << 20).view(torch.float32)


def _scale_code_floor(s: torch.Tensor) -> torch.Tensor:
    """Largest e5m3 code whose scale is <= s (float32 >= 0), clamped to [0, 255]; int32."""
    return ((s.view(torch.int32) >> 20) - 8 * (127 - _E5M3_BIAS)).clamp_(0, 255)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """(M, K) values in [0, 15] → (M, K // 2) uint8 in the documented nibble order."""
    M, K = q.shape
    q = q.to(torch.uint8).view(M, K // group_size, 2, group_size // 2)  # (M, N, 2, G/2)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(M, K // 2)


def unpack_int4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """(M, K // 2) uint8 → (M, K) uint8 in [0, 15]; inverse of pack_int4."""
    M, K2 = qweight.shape
    b = qweight.view(M, 2 * K2 // group_size, 1, group_size // 2)  # (M, N, 1, G/2)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(M, 2 * K2)


def group_scale_min(q: QTensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 (scale, min) per group, (M, K // G) each, so w = scale * q + min (int4) or
    w = scale * q (int8, min None), both exact: what a kernel multiplies by."""
    if q.zeros is None:
        return q.scales.float(), None
    s = decode_scales(q.scales)
    return s, -s * q.zeros.float() / 16


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """QTensor → dense (M, K) weight in `dtype` (exact in float32: see the module docstring)."""
    M, K = q.shape
    G = q.spec.group_size
    if q.zeros is None:
        w = q.qweight.float().view(M, K // G, G) * q.scales.float()[..., None]  # (M, N, G)
    else:
        v = unpack_int4(q.qweight, G).float().view(M, K // G, G)  # (M, N, G)
        w = (v - q.zeros.float()[..., None] / 16) * decode_scales(q.scales)[..., None]
    return w.view(M, K).to(dtype)


def dequantize_ref(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The formulas of the docstring spelled out column by column (slow; the test oracle)."""
    M, K = q.shape
    G = q.spec.group_size
    k = torch.arange(K)
    g, j = k // G, k % G
    if q.zeros is None:
        w = q.qweight.float() * q.scales.float()[:, g]
    else:
        byte = q.qweight[:, g * (G // 2) + j % (G // 2)].to(torch.int32)  # (M, K)
        nib = torch.where(j < G // 2, byte & 0x0F, byte >> 4).float()
        w = decode_scales(q.scales[:, g]) * (nib - q.zeros[:, g].float() / 16)
    return w.to(dtype)


# ---- quantize ------------------------------------------------------------------------------

def _check(weight: torch.Tensor, spec: QuantSpec) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise FormatError(f"can only quantize a 2-D float weight, got {weight.dtype} "
                          f"{tuple(weight.shape)}")
    if weight.shape[1] % spec.group_size:
        raise FormatError(f"in-features K={weight.shape[1]} is not a multiple of the group size "
                          f"{spec.group_size} ({spec.name}); use a group size that divides K")


def _quantize(weight: torch.Tensor, spec: QuantSpec, search: bool,
              int8_scale_dtype: torch.dtype = torch.float16) -> QTensor:
    _check(weight, spec)
    M, K = weight.shape
    G = spec.group_size
    N = K // G
    R = max(1, _CHUNK // K)
    qweight = torch.empty(M, K // 2 if spec.bits == 4 else K,
                          dtype=torch.uint8 if spec.bits == 4 else torch.int8)
    zeros = torch.empty(M, N, dtype=torch.uint8) if spec.bits == 4 else None
    scales = torch.empty(M, N, dtype=torch.uint8 if spec.bits == 4 else int8_scale_dtype)
    from .qsearch import int4_groups, int8_groups, new_scratch, scratch

    ws = new_scratch()
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
        if scales.dtype == torch.float16 and not fits_f16:
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
    return _quantize(weight, spec, spec.search, int8_scales or torch.float16)


def quantize_ref(weight: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Plain round-to-nearest: scale from the group's [min(w, 0), max(w, 0)] range (int4, scale
    rounded up to its code) or absmax / 127 (int8). Same layout and checks as quantize()."""
    return _quantize(weight, replace(spec, search=False), False)
