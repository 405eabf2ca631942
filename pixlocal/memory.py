"""Memory arithmetic, one place: bytes of weights (from checkpoint headers or from shapes alone),
KV cache per layer and per token, the activation reserve of a prefill, and what a decode step
reads. placement plans with these figures; `info` (cli/models.py), `doctor` and `bench` print
them and what they compose of them.

Weights count as they sit in memory once loaded: quantized tensors as stored (qformat.SCHEMES),
every other tensor in the load dtype. The KV cache holds k and v, (n_kv_heads, head_dim) per
token and layer, in the activation dtype. Activation estimates are upper bounds from the shapes
(per-token rows of every live intermediate, float32 where a kernel returns float32, one
dequantized weight tile); SDPA on CUDA needs no (L, L) score matrix for these calls (no mask,
or causal).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import PixtralArgs
from .qformat import DECODER_LINEAR, HEAD_TENSORS, SUFFIXES, QuantSpec, stored_tensors

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

TILE_ELEMS = 1 << 24  # = kernels.cuda.TILE_ELEMS (not imported: that module is the GPU's)


def checkpoint_bytes(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, int]:
    """Bytes per tensor once loaded: quantized tensors (qweight/scales/zeros) as stored, every
    other tensor cast to `dtype` (what the loader does)."""
    out = {}
    quant = set(ckpt.quantized()) if ckpt.kind == "pixlocal" else set()
    for name in ckpt.names():
        base, _, leaf = name.rpartition(".")
        stored = base in quant and leaf in SUFFIXES
        size = ckpt.dtype(name).itemsize if stored else dtype.itemsize
        out[name] = math.prod(ckpt.shape(name)) * size
    return out


def _meta_model(args: PixtralArgs) -> nn.Module:
    from .model import PixtralModel

    with torch.device("meta"):
        return PixtralModel(args)


def estimate_bytes(args: PixtralArgs, quant: QuantSpec | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes per tensor of a model of `args` shape under the quantizer's default recipe:
    decoder linears `quant`, head and embeddings int8-g32, the rest (norms, vision) `dtype`;
    quant None: everything `dtype`. Names as a quantized shard holds them."""
    head = QuantSpec.default(8)
    out = {}
    for name, p in _meta_model(args).named_parameters():
        target: QuantSpec | torch.dtype = dtype
        if quant is not None and p.dim() == 2:
            if DECODER_LINEAR.fullmatch(name):
                target = quant
            elif name in HEAD_TENSORS:
                target = head
        for n, dt, shape in stored_tensors(name, tuple(p.shape), target):
            out[n] = math.prod(shape) * dt.itemsize
    return out


def param_counts(args: PixtralArgs) -> dict[str, int]:
    """Parameters of the decoder (embeddings and head included) and of the vision tower."""
    counts = {"decoder": 0, "vision": 0}
    for n, p in _meta_model(args).named_parameters():
        counts["vision" if n.startswith("vision_") else "decoder"] += p.numel()
    return counts


def kv_bytes_per_layer(args: PixtralArgs, context_len: int, itemsize: int = 2) -> int:
    """One decoder layer's k and v for `context_len` tokens."""
    return 2 * args.n_kv_heads * args.head_dim * context_len * itemsize


def kv_bytes_per_token(args: PixtralArgs, itemsize: int = 2) -> int:
    """k and v of one token over every decoder layer."""
    return args.n_layers * kv_bytes_per_layer(args, 1, itemsize)


def image_tokens(args: PixtralArgs, max_image_size: int | None = None) -> int:
    """Patches of the largest image the encoder takes (a square at max size)."""
    v = args.vision_encoder
    if v is None:
        return 0
    side = (max_image_size or v.image_size) // v.patch_size
    return side * side


def prefill_chunk(context_len: int, image_patches: int) -> int:
    """Most tokens one prefill call runs through the decoder: the largest image's tokens (its
    patches and row breaks) + 512 of text. The activation reserve is sized for this many, and
    longer prompts run in chunks of it (generate.Pixtral)."""
    return max(1, min(context_len, image_patches + math.isqrt(image_patches) + 512))


def activation_bytes(args: PixtralArgs, context_len: int, image_patches: int,
                     itemsize: int = 2) -> tuple[int, int]:
    """(vision, decoder) activation peaks: the largest image through the encoder + adapter
    (images go through one at a time); a prefill chunk (`prefill_chunk` tokens) through one
    decoder layer + the head, and the keys and values of the whole context repeated to every
    query head (the CUDA attention of a chunk after a cached prefix: cuda_attn.py)."""
    tile = 2 * TILE_ELEMS * 4
    vis = 0
    v = args.vision_encoder
    if v is not None and image_patches:
        D, F = v.hidden_size, v.intermediate_size
        vis = image_patches * (4 * D * itemsize + 3 * F * itemsize + F * 4 + D * 4
                               + args.dim * (4 + itemsize)) + tile
    L = prefill_chunk(context_len, image_patches)
    D, F = args.dim, args.hidden_dim
    dec = L * (3 * F * itemsize + F * 4 + 4 * D * 4 + args.n_heads * args.head_dim * 4) \
        + args.vocab_size * 4 + tile + 2 * args.n_heads * context_len * args.head_dim * itemsize
    return vis, dec
