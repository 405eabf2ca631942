"""CUDA backend: torch's tinygemm for int4 decode, dequantize-a-tile + cuBLAS GEMM otherwise.

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

Prefill (more than TINYGEMM_MAX_TOKENS tokens) is compute-bound: rows are dequantized a tile
at a time to bf16 (fp16 below capability 8.0, float32 on the CPU twin) and multiplied by the
GEMM. To dequantize tinygemm-packed rows the in-block permutation is learnt once per ikt by
packing probe tiles whose nibbles spell their own positions (`learn_block_perm`): no layout is
assumed beyond the block structure above. int8 (group scales; `_weight_int8pack_mm` takes one
scale per row only) always takes the dequantize-tile path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..qformat import QTensor, decode_scales, dequantize, unpack_int4

# Shapes: L tokens · K in-features · M out-features · G group size · ikt inner k-tiles

TINYGEMM_MAX_TOKENS = 16  # more tokens: dequantize tiles + GEMM (tinygemm is a GEMV at heart)
TILE_ELEMS = 1 << 24  # weights dequantized per prefill tile (32 MiB of bf16)
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


def inner_k_tiles(K: int) -> int | None:
    """The largest tinygemm inner k-tile count (8, 4, 2) whose 16*ikt divides K, else None."""
    return next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)


def kernel_for(bits: int, shape: tuple[int, int], tokens: int,
               cap: tuple[int, int] | None) -> str:
    """Which kernel a (M, K) weight of `bits` bits uses for `tokens` tokens on a device of
    compute capability `cap` (None = the CPU twin): "tinygemm-int4" or "dequant-gemm-<dtype>"."""
    M, K = shape
    rows = _BLOCK_ROWS if cap is not None else 16  # the CPU twin packs 16 rows at a time
    fits = M % rows == 0 and inner_k_tiles(K) is not None
    if bits == 4 and fits and (cap is None or cap >= (8, 0)) and tokens <= TINYGEMM_MAX_TOKENS:
        return "tinygemm-int4"
    return "dequant-gemm-" + str(gemm_dtype(cap)).removeprefix("torch.")


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


def _cuda_pack(values: torch.Tensor, ikt: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(tinygemm_nibbles(values).contiguous(), ikt)


_PERMS: dict[tuple[str, int], torch.Tensor] = {}  # (device, ikt) → learnt block permutation


def prepare(q: QTensor) -> QTensor:
    """Repack an int4 weight for tinygemm on its device (q's tensors' device); other weights
    (int8, shapes tinygemm cannot tile, GPUs below capability 8.0) come back unchanged."""
    dev = q.qweight.device
    if isinstance(q, TinyGemmQTensor) or kernel_for(q.spec.bits, q.shape, 1,
                                                    capability(dev)) != "tinygemm-int4":
        return q
    ikt = inner_k_tiles(q.shape[1])
    assert ikt is not None
    values = unpack_int4(q.qweight, q.spec.group_size).to(torch.int32)  # (M, K)
    pairs = scale_zero_pairs(q).to(torch.bfloat16)
    if dev.type == "cuda":
        key = (str(dev), ikt)
        if key not in _PERMS:
            _PERMS[key] = learn_block_perm(lambda v: _cuda_pack(v, ikt), ikt, dev)
        return TinyGemmQTensor(_cuda_pack(values, ikt), pairs, None, q.shape, q.spec, ikt,
                               _PERMS[key])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, ikt)
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
    """x (L, K) @ W.T → (L, M) float32, on x's device (q's tensors live there too)."""
    assert x.dim() == 2 and x.shape[1] == q.shape[1], (tuple(x.shape), q.shape)
    L = x.shape[0]
    M, K = q.shape
    cap = capability(x.device)
    if isinstance(q, TinyGemmQTensor) and L <= TINYGEMM_MAX_TOKENS:
        xb = x.to(torch.bfloat16).contiguous()  # tinygemm wants bf16 activations
        if x.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(xb, q.qweight, q.spec.group_size, q.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, q.qweight, q.spec.group_size,
                                                           q.scales)
        return y.float()
    dt = gemm_dtype(cap)
    xd = x.to(dt)
    out = torch.empty(L, M, dtype=torch.float32, device=x.device)
    step = max(_BLOCK_ROWS, TILE_ELEMS // K // _BLOCK_ROWS * _BLOCK_ROWS)
    for r0 in range(0, M, step):
        r1 = min(M, r0 + step)
        out[:, r0:r1] = xd @ dequantize_rows(q, r0, r1, dt).T  # (L, rows)
    return out
