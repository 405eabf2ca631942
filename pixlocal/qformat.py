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

A model dir (written by `pixlocal quantize`, read by checkpoint.py): params.json, tekken.json,
quantized-NNNNN-of-NNNNN.safetensors and quantized.index.json = {"metadata": {...as below,
"total_size"}, "shards": {file: {"size", "sha256"}}, "weight_map": {tensor: file}}. Every
shard's __metadata__: {"format": "pixlocal", "format_version": "1", "quant": "<default spec
name>", "group_size": "<its G>", "source": "<sha256 of the source params.json/config.json>"}.
Weight `{m}.weight` quantized is stored as `{m}.qweight/.scales[/.zeros]` (a tensor is quantized
iff "{m}.scales" is present; its scheme is read from its own tensors, QTensor.from_tensors, so
a file mixes schemes); other tensors keep their names. Any layout change bumps FORMAT_VERSION.

SCHEMES below is this table as data (suffix, dtype, columns as a function of K and G): every
module that allocates, checks or sizes these tensors reads it. quantize() and quantize_ref()
live in quant/quantizer.py (pixlocal.quant), which imports this module; the runtime never
quantizes. DECODER_LINEAR and HEAD_TENSORS name the tensors of the default recipe
(quant/recipe.py; memory's estimates).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .errors import FormatError

# Shapes: K in-features · M out-features · G group size · N groups per row

FORMAT_NAME = "pixlocal"
FORMAT_VERSION = 1
GROUP_SIZES = (32, 64, 128)
_DEFAULT_GROUP = {4: 32, 8: 32}

_E5M3_BIAS = 26  # s = (1 + f/8) * 2^(e - 26)
SCALE_MIN = 2.0**-26  # e5m3 code 0
SCALE_MAX = 1.875 * 2.0**5  # e5m3 code 255 = 60.0
F16_NORMAL = (2.0**-14, 65504.0)  # int8 scales outside it (zero aside) are stored bfloat16
INT8_SCALE_DTYPE = torch.float16  # int8 scales' dtype unless one leaves F16_NORMAL
INT8_SCALE_DTYPES = (INT8_SCALE_DTYPE, torch.bfloat16)


@dataclass(frozen=True)
class Part:
    """One stored tensor of a quantized (M, K) weight: `{name}.{suffix}`, (M, cols(K, G))."""

    suffix: str
    dtype: torch.dtype
    cols: Callable[[int, int], int]


# The layout table of the module docstring, by bits: the tensors of one quantized weight in
# the order they are written. int8's scale dtype is INT8_SCALE_DTYPE or bfloat16 (per tensor).
SCHEMES: dict[int, tuple[Part, ...]] = {
    4: (Part("qweight", torch.uint8, lambda K, G: K // 2),
        Part("scales", torch.uint8, lambda K, G: K // G),  # e5m3 codes
        Part("zeros", torch.uint8, lambda K, G: K // G)),  # z * 16
    8: (Part("qweight", torch.int8, lambda K, G: K),
        Part("scales", INT8_SCALE_DTYPE, lambda K, G: K // G)),
}
SUFFIXES = ("qweight", "scales", "zeros")  # every suffix a quantized weight may have

# The default recipe's names (quant/recipe.py applies it, memory.estimate_bytes sizes it)
DECODER_LINEAR = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")
HEAD_TENSORS = ("output.weight", "tok_embeddings.weight")  # int8 by default


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

    def layout(self, shape: tuple[int, ...], int8_scales: torch.dtype | None = None
               ) -> list[tuple[str, torch.dtype, tuple[int, int]]]:
        """(suffix, dtype, shape) of each stored tensor of an (M, K) weight (SCHEMES)."""
        M, K = shape
        swap = int8_scales is not None and self.bits == 8
        return [(p.suffix, int8_scales if swap and p.suffix == "scales" else p.dtype,
                 (M, p.cols(K, self.group_size))) for p in SCHEMES[self.bits]]

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes an (M, K) weight takes stored (both int8 scale dtypes are 2 bytes)."""
        return sum(d.itemsize * r * c for _, d, (r, c) in self.layout(shape))

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
        return {f"{name}.{p.suffix}": getattr(self, p.suffix) for p in SCHEMES[self.spec.bits]}

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
        got = [(s, t.dtype, tuple(t.shape)) for s, t in
               (("qweight", qweight), ("scales", scales), ("zeros", zeros)) if t is not None]
        ok = found is not None and any(got == found.layout((M, K), d) for d in INT8_SCALE_DTYPES)
        if not ok:
            raise FormatError(f"{name}: inconsistent quantized tensors (qweight {qweight.dtype} "
                              f"{tuple(qweight.shape)}, scales {scales.dtype} "
                              f"{tuple(scales.shape)}, zeros "
                              f"{None if zeros is None else (zeros.dtype, tuple(zeros.shape))})")
        assert found is not None
        if spec is not None and (spec.bits, spec.group_size) != (bits, G):
            raise FormatError(f"{name}: stored as {found.name}, expected {spec.name}")
        return cls(qweight, scales, zeros, (M, K), spec or found)


def stored_tensors(name: str, shape: tuple[int, ...], target: QuantSpec | torch.dtype,
                   int8_scales: torch.dtype | None = None
                   ) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of what a checkpoint tensor is stored as: a weight `{m}.weight`
    quantized as `target` becomes `{m}.qweight` etc. (SCHEMES); under a float dtype it keeps
    its name and shape."""
    if not isinstance(target, QuantSpec):
        return [(name, target, tuple(shape))]
    base = name.removesuffix(".weight")
    return [(f"{base}.{s}", d, sh) for s, d, sh in target.layout(shape, int8_scales)]


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


def scale_code_floor(s: torch.Tensor) -> torch.Tensor:
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
