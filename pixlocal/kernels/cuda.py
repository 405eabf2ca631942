"""CUDA backend: torch's tinygemm for int4, a fused Triton group-dequantize GEMM for weights
in the stored layout (cuda_fused.py), dequantize-a-tile + cuBLAS GEMM for long prefills.
(Over 300 lines: the tinygemm packing contract, its inverse and the dispatch read as one.)

Functions mirror ref.py (`qmatmul(x, q)` → (L, M) float32) plus `prepare(q)`, which repacks an
int4 weight once, at load time, for tinygemm. Every op used here has a CPU twin, so the whole
backend runs (and is tested) on CPU: `_convert_weight_to_int4pack_for_cpu` /
`_weight_int4pack_mm_for_cpu` stand in for the CUDA ops when the tensors live on the CPU.

tinygemm (`torch.ops.aten._weight_int4pack_mm`, compute capability >= 8.0, bf16 activations)
computes w = (q - 8) * scale + zero per group, with q in [0, 15] and a (scale, zero) pair per
(group, out-row) in a bf16 tensor of shape (K // G, M, 2) (torch's own test helper
`_group_quantize_tensor` builds it the same way). Our int4 (qformat) is w = s * (q - z), so

    scale = s,   zero = s * (8 - z)                                       (exact in float32)

s (4 significant bits) is exact in bf16; zero has up to 11 significant bits and is rounded to
bf16's 8: an offset of at most |zero| * 2^-9 <= s / 64 per group, ~5% of the grid's own RMS
rounding error (s / sqrt(12)). The decode and prefill paths both use the bf16 pair, so they
see the same weights.

The CUDA packer `_convert_weight_to_int4pack(w, inner_k_tiles)` takes uint8 (M, K // 2) with
column 2j in the HIGH nibble and 2j + 1 in the low one (int4mm.cu: "v[0]H" is k = 0), not our
stored group-split order, and returns int32 (M / 8, K / (16 * ikt), 32, ikt / 2): block
(m-tile, k-supertile) holds exactly the 8 x 16*ikt nibbles of its tile, permuted the same way
in every block. The CPU twin takes int32 (M, K) values and returns an ISA-specific uint8 layout.

Which kernel a weight takes (`kernel_for`, also what `doctor` prints):
  tinygemm-int4          int4 prepared for tinygemm, 1..16 tokens: one call
  tinygemm-int4-chunked  17..TINYGEMM_CHUNKED_MAX_TOKENS tokens (a chat turn): 16-token calls,
                         each reading the packed weight (0.56 byte a weight) again: 13 calls
                         for 200 tokens read 7.3 bytes a weight, where dequantizing the packed
                         rows to a bf16 tile moves ~56 (int32 nibble unpacking, the block
                         permutation, float32 arithmetic; packed_values, dequantize_rows)
                         before the GEMM reads 2 more
  fused-dequant-<dtype>  a stored-layout weight (int8; int4 where tinygemm is missing), up to
                         cuda_fused.FUSED_MAX_TOKENS tokens: the Triton kernel of
                         cuda_fused.py reads the stored bytes once, writes no weight
  dequant-gemm-<dtype>   the rest (long prefills, or no Triton): rows dequantized a tile at a
                         time (TILE_ELEMS weights) to bf16 (fp16 below capability 8.0, float32
                         on the CPU twin) and multiplied by the GEMM
To dequantize tinygemm-packed rows the in-block permutation is learnt once per ikt by packing
probe tiles whose nibbles spell their own positions (`learn_block_perm`): no layout is assumed
beyond the block structure above.

tinygemm is refused, with one line (`tinygemm_missing`, shown by doctor), on ROCm (its packer
tiles 16 rows: the 8-row probe would write out of bounds), below compute capability 8.0, and
on a torch build whose int4 ops are missing or raise (e.g. CUDA 11.8 builds): int4 then keeps
its stored layout and takes the fused kernel (or dequant-gemm without Triton).

Below capability 8.0 the GEMMs and attention compute in float16, and a bf16 hidden state may
exceed float16's 65504 (inf would poison every later layer): a GEMM's input rows are scaled
by a power of two into range first and its float32 output scaled back (`half_rows`: exact, the
fp16 GEMM output stays in range too); attention's inputs are clamped (`to_dtype`,
cuda_attn.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..qformat import QTensor, decode_scales, dequantize, unpack_int4

# Shapes: L tokens · K in-features · M out-features · G group size · ikt inner k-tiles

TINYGEMM_MAX_TOKENS = 16  # tokens one tinygemm call takes (it is a GEMV at heart)
TINYGEMM_CHUNKED_MAX_TOKENS = 256  # up to here: 16-token tinygemm calls (module docstring)
FUSED_MAX_TOKENS = 256  # = cuda_fused.FUSED_MAX_TOKENS (imported lazily: Triton is optional)
TILE_ELEMS = 1 << 24  # weights dequantized per prefill tile (32 MiB of bf16)
F16_MAX = 65504.0
HALF_ROW_MAX = 2.0**10  # half_rows brings each row's largest magnitude under this
_BLOCK_ROWS = 8  # tinygemm n-tile


@dataclass
class TinyGemmQTensor(QTensor):
    """An int4 QTensor repacked for tinygemm (replaces the stored tensors on the device):
    qweight is the packed int32 tensor (CUDA) or the CPU twin's uint8 layout, scales the bf16
    (scale, zero) pairs (K // G, M, 2), zeros None. Only this backend reads it."""

    inner_k_tiles: int = 8
    perm: torch.Tensor | None = None  # (8 * 16 * ikt,) block position → tile index (CUDA)
    values: torch.Tensor | None = None  # CPU twin only: the int32 (M, K) q values


def capability(device: torch.device | str) -> tuple[int, int] | None:
    """CUDA compute capability of `device`; None for a CPU (whose twins always work)."""
    d = torch.device(device)
    return torch.cuda.get_device_capability(d) if d.type == "cuda" else None


def gemm_dtype(cap: tuple[int, int] | None) -> torch.dtype:
    """The GEMM dtype of the dequantize path: bf16 from Ampere on, fp16 before, fp32 on CPU."""
    if cap is None:
        return torch.float32
    return torch.bfloat16 if cap >= (8, 0) else torch.float16


def compute_dtype(dtype: torch.dtype, cap: tuple[int, int] | None) -> torch.dtype:
    """What a part loaded in `dtype` computes in on a device of capability `cap`: bfloat16
    becomes float16 below 8.0 (emulated on Turing, failing on Volta and Pascal)."""
    return torch.float16 if dtype == torch.bfloat16 and cap is not None and cap < (8, 0) \
        else dtype


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; into float16 its values clamp to +-65504 instead of overflowing to inf."""
    y = x.to(dtype)
    if dtype == torch.float16 and y is not x:
        y.clamp_(-F16_MAX, F16_MAX)
    return y


def half_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (L, K) → (float16 x / s, s (L, 1) float32): s a power of two per row (1 for rows
    already under HALF_ROW_MAX) so that x / s fits float16 with room for a GEMM's sums;
    only exponents change, so x / s * s == x where x is float16-representable."""
    m = x.abs().amax(1, keepdim=True).float()
    s = torch.exp2(torch.ceil(torch.log2(m / HALF_ROW_MAX)).clamp_(min=0))
    return (x.float() / s).to(torch.float16), s


def inner_k_tiles(K: int) -> int | None:
    """The largest tinygemm inner k-tile count (8, 4, 2) whose 16*ikt divides K, else None."""
    return next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)


def kernel_for(bits: int, shape: tuple[int, int], tokens: int, cap: tuple[int, int] | None,
               *, tinygemm: bool = True, fused: bool = False) -> str:
    """Which kernel (module docstring) a (M, K) weight of `bits` bits uses for `tokens` tokens
    on a device of compute capability `cap` (None = the CPU twin); `tinygemm`: whether this
    build and device have it (tinygemm_missing), `fused`: whether the Triton kernel runs."""
    M, K = shape
    rows = _BLOCK_ROWS if cap is not None else 16  # the CPU twin packs 16 rows at a time
    fits = M % rows == 0 and inner_k_tiles(K) is not None
    dt = str(gemm_dtype(cap)).removeprefix("torch.")
    if bits == 4 and fits and tinygemm and (cap is None or cap >= (8, 0)):
        if tokens <= TINYGEMM_MAX_TOKENS:
            return "tinygemm-int4"
        if tokens <= TINYGEMM_CHUNKED_MAX_TOKENS:
            return "tinygemm-int4-chunked"
        return "dequant-gemm-" + dt
    if fused and tokens <= FUSED_MAX_TOKENS:
        return "fused-dequant-" + dt
    return "dequant-gemm-" + dt


def _int4pack(values: torch.Tensor, ikt: int) -> torch.Tensor:
    """int32 (M, K) values in [0, 15] → tinygemm's packed weight on their device."""
    if values.device.type == "cuda":
        return torch.ops.aten._convert_weight_to_int4pack(tinygemm_nibbles(values).contiguous(),
                                                          ikt)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, ikt)


def _int4mm(x: torch.Tensor, packed: torch.Tensor, G: int, pairs: torch.Tensor
            ) -> torch.Tensor:
    """bf16 x (L <= 16, K) @ the packed weight → (L, M) bf16 (tinygemm or its CPU twin)."""
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, packed, G, pairs)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, pairs)


_MISSING: dict[str, str | None] = {}  # device → why tinygemm cannot run there (probed once)


def tinygemm_missing(device: torch.device | str) -> str | None:
    """One line saying why tinygemm cannot run int4 on `device`, None where it can (module
    docstring): ROCm, capability < 8.0, or int4 ops that are missing or raise on a probe."""
    d = torch.device(device)
    if torch.version.hip:
        return (f"ROCm build (torch {torch.__version__}): tinygemm's int4 layout differs "
                f"there; int4 runs {_fallback(d)}")
    cap = capability(d)
    if cap is not None and cap < (8, 0):
        return (f"compute capability {cap[0]}.{cap[1]} < 8.0 has no tinygemm; int4 runs "
                f"{_fallback(d)}")
    key = str(d)
    if key not in _MISSING:
        try:  # a 16 x 64 weight of zeros through both ops (16 rows: the CPU twin's tile)
            packed = _int4pack(torch.zeros(16, 64, dtype=torch.int32, device=d), 2)
            _int4mm(torch.zeros(1, 64, dtype=torch.bfloat16, device=d), packed, 32,
                    torch.zeros(2, 16, 2, dtype=torch.bfloat16, device=d))
            _MISSING[key] = None
        except Exception as e:  # noqa: BLE001  (any failure of the probe: no tinygemm)
            _MISSING[key] = (f"torch {torch.__version__} (CUDA {torch.version.cuda}) has no "
                             f"working tinygemm int4 kernel ({type(e).__name__}); int4 runs "
                             f"{_fallback(d)}")
    return _MISSING[key]


def fused_available(device: torch.device | str) -> bool:
    """Whether the Triton kernel (cuda_fused.py) runs on `device`."""
    from . import cuda_fused
    return cuda_fused.available(torch.device(device))


def _fallback(d: torch.device) -> str:
    return ("the fused Triton kernel" if fused_available(d) else
            "dequantize + GEMM per call (slow decode: install triton)")


def scale_zero_pairs(q: QTensor) -> torch.Tensor:
    """float32 (K // G, M, 2): tinygemm's (scale, zero) per group, zero = s * (8 - z)."""
    s = decode_scales(q.scales)  # (M, K // G)
    assert q.zeros is not None
    return torch.stack([s, s * (8 - q.zeros.float() / 16)], dim=-1).transpose(0, 1).contiguous()


def tinygemm_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int (M, K) in [0, 15] → uint8 (M, K // 2), column 2j high nibble, 2j + 1 low (CUDA
    packer input)."""
    v = values.to(torch.uint8)
    return (v[:, 0::2] << 4) | v[:, 1::2]


def int32_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """int32 (..., W) → uint8 (..., 8 W): nibble i of each word (bits 4i..4i+3) in order i."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed[..., None] >> shifts) & 15).to(torch.uint8).flatten(-2)


def learn_block_perm(pack: Callable[[torch.Tensor], torch.Tensor], ikt: int,
                     device: torch.device | str) -> torch.Tensor:
    """Where each of a block's 8 x 16*ikt values lands: `pack` maps int32 values (8, 16*ikt)
    to one packed block (int32, any shape); returns perm (8*16*ikt,) int64 with
    perm[j] = flat tile index of the value stored at nibble j."""
    n = _BLOCK_ROWS * 16 * ikt
    idx = torch.arange(n, device=device)
    perm = torch.zeros(n, dtype=torch.int64, device=device)
    for b in range(math.ceil(math.log2(n) / 4)):  # each probe spells 4 bits of the index
        probe = ((idx >> (4 * b)) & 15).to(torch.int32).view(_BLOCK_ROWS, -1)
        perm |= int32_nibbles(pack(probe).reshape(-1)).long() << (4 * b)
    assert torch.equal(perm.sort().values, idx), "tinygemm packing is not a block permutation"
    return perm


_PERMS: dict[tuple[str, int], torch.Tensor] = {}  # (device, ikt) → learnt block permutation


def prepare(q: QTensor) -> QTensor:
    """Repack an int4 weight for tinygemm on its device (q's tensors' device); other weights
    (int8, shapes tinygemm cannot tile, devices or builds without tinygemm) come back
    unchanged: the fused and dequantize kernels read the stored layout."""
    dev = q.qweight.device
    if isinstance(q, TinyGemmQTensor) or q.spec.bits != 4 or kernel_for(
            4, q.shape, 1, capability(dev), tinygemm=tinygemm_missing(dev) is None
    ) != "tinygemm-int4":
        return q
    ikt = inner_k_tiles(q.shape[1])
    assert ikt is not None
    values = unpack_int4(q.qweight, q.spec.group_size).to(torch.int32)  # (M, K)
    pairs = scale_zero_pairs(q).to(torch.bfloat16)
    packed = _int4pack(values, ikt)
    if dev.type == "cuda":
        key = (str(dev), ikt)
        if key not in _PERMS:
            _PERMS[key] = learn_block_perm(lambda v: _int4pack(v, ikt), ikt, dev)
        return TinyGemmQTensor(packed, pairs, None, q.shape, q.spec, ikt, _PERMS[key])
    return TinyGemmQTensor(packed, pairs, None, q.shape, q.spec, ikt, None, values)


def packed_values(q: TinyGemmQTensor, r0: int, r1: int) -> torch.Tensor:
    """int values (r1 - r0, K) of rows r0..r1 (multiples of 8) of a prepared weight."""
    if q.values is not None:
        return q.values[r0:r1]
    assert q.perm is not None
    K, B = q.shape[1], _BLOCK_ROWS
    blocks = q.qweight[r0 // B:r1 // B]  # (nt, K / (16 ikt), 32, ikt / 2) int32
    nib = int32_nibbles(blocks.flatten(2))  # (nt, KO, 8 * 16 ikt) in storage order
    tile = torch.empty_like(nib)
    tile[..., q.perm] = nib  # back to tile order: (nt, KO, 8 rows x 16 ikt cols)
    return tile.view(tile.shape[0], tile.shape[1], B, -1).transpose(1, 2).reshape(r1 - r0, K)


def dequantize_rows(q: QTensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows r0..r1 of the weight, (r1 - r0, K) in `dtype`, as this backend's kernels see it."""
    M, K = q.shape
    G = q.spec.group_size
    if isinstance(q, TinyGemmQTensor):
        v = packed_values(q, r0, r1).to(torch.float32).view(r1 - r0, K // G, G)
        sz = q.scales[:, r0:r1].transpose(0, 1).float()  # (rows, K // G, 2)
        return ((v - 8) * sz[..., :1] + sz[..., 1:]).view(r1 - r0, K).to(dtype)
    rows = QTensor(q.qweight[r0:r1], q.scales[r0:r1],
                   None if q.zeros is None else q.zeros[r0:r1], (r1 - r0, K), q.spec)
    return dequantize(rows, dtype)


def qmatmul(x: torch.Tensor, q: QTensor) -> torch.Tensor:
    """x (L, K) @ W.T → (L, M) float32, on x's device (q's tensors live there too), by the
    kernel `kernel_for` names (module docstring)."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    L = x.shape[0]
    M, K = q.shape
    cap = capability(x.device)
    if isinstance(q, TinyGemmQTensor) and L <= TINYGEMM_CHUNKED_MAX_TOKENS:
        out = torch.empty(L, M, dtype=torch.float32, device=x.device)
        xb = x.to(torch.bfloat16).contiguous()  # tinygemm wants bf16 activations
        for i in range(0, L, TINYGEMM_MAX_TOKENS):
            out[i:i + TINYGEMM_MAX_TOKENS] = _int4mm(xb[i:i + TINYGEMM_MAX_TOKENS], q.qweight,
                                                     q.spec.group_size, q.scales)
        return out
    dt = gemm_dtype(cap)
    xd, s = half_rows(x) if dt == torch.float16 else (x.to(dt), None)
    if not isinstance(q, TinyGemmQTensor) and L <= FUSED_MAX_TOKENS \
            and fused_available(x.device):
        from . import cuda_fused
        y = cuda_fused.qmm(xd, q)
        return y if s is None else y.mul_(s)
    out = torch.empty(L, M, dtype=torch.float32, device=x.device)
    step = max(_BLOCK_ROWS, TILE_ELEMS // K // _BLOCK_ROWS * _BLOCK_ROWS)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        out[:, r0:r1] = xd @ dequantize_rows(q, r0, r1, dt).T  # (L, rows)
    return out if s is None else out.mul_(s)

