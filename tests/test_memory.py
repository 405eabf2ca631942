"""pixlocal.memory: the figures placement, `info`, `doctor` and `bench` print, pinned to the
values the code gave before the arithmetic moved into one module (any change here changes a
printed plan or estimate)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from pixlocal import memory, placement
from pixlocal.cli.bench import decode_bytes_per_token
from pixlocal.cli.doctor import describe_plan
from pixlocal.config import PixtralArgs
from pixlocal.qformat import QuantSpec

A12, TINY = PixtralArgs.pixtral_12b(), PixtralArgs.tiny()


def _digest(d: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(d.items())).encode()).hexdigest()[:16]


# (args, scheme, dtype) → (total bytes, tensors, digest of every (name, bytes) pair); group sizes
# that divide every in-features (the tiny model's 96 is no multiple of 64: the old code counted
# M*K//G scale groups there, the table M*(K//G), and the quantizer would fall back to g32)
ESTIMATES = [
    (A12, "int4-g32", torch.bfloat16, 8430977024, 1147, "dc83713bda2a2c5c"),
    (A12, "int4-g32", torch.float32, 9301721088, 1147, "dea0b9f5a9965351"),
    (A12, "int8-g64", torch.bfloat16, 13542785024, 867, "234e08eea1f389cc"),
    (A12, "int4-g128", torch.bfloat16, 7919796224, 1147, "8513bb73ad5ed6cd"),
    (A12, None, torch.bfloat16, 25365479424, 585, "2477fef9ceab6cbd"),
    (A12, None, torch.float32, 50730958848, 585, "d857c8f1b88174ae"),
    (TINY, "int4-g32", torch.float32, 18027136, 66, "3b64416667fc3e93"),
    (TINY, "int8-g32", torch.bfloat16, 17984064, 52, "8bb8c91bc2d64cf2"),
    (TINY, None, torch.float32, 67563648, 36, "72dc0647b79440ca"),
]


@pytest.mark.parametrize("args,scheme,dtype,total,n,digest", ESTIMATES)
def test_estimate_bytes_pinned(args, scheme, dtype, total, n, digest):
    e = memory.estimate_bytes(args, None if scheme is None else QuantSpec.parse(scheme), dtype)
    assert (sum(e.values()), len(e), _digest(e)) == (total, n, digest)


def test_kv_activation_and_params_pinned():
    assert memory.kv_bytes_per_layer(A12, 32768) == 134217728
    assert memory.kv_bytes_per_layer(A12, 1000, 4) == 8192000
    assert memory.kv_bytes_per_token(A12) == 163840
    assert memory.kv_bytes_per_token(A12, 4) == 327680
    assert memory.kv_bytes_per_token(TINY) == 384
    assert memory.kv_bytes_per_layer(TINY, 32768) == 6291456
    # one token's KV over every layer is the per-layer figure for one token, times layers
    assert memory.kv_bytes_per_token(A12) == A12.n_layers * memory.kv_bytes_per_layer(A12, 1)
    assert memory.image_tokens(A12) == 4096 and memory.image_tokens(A12, 512) == 1024
    assert memory.activation_bytes(A12, 32768, 4096) == (478150656, 1800667136)
    assert memory.activation_bytes(A12, 4096, 1024, 4) == (264241152, 782761984)
    assert memory.activation_bytes(A12, 100, 0) == (0, 160546816)
    assert memory.activation_bytes(TINY, 32768, 4096) == (139329536, 158388224)
    assert memory.param_counts(A12) == {"decoder": 12247782400, "vision": 434957312}
    assert memory.param_counts(TINY) == {"decoder": 16851264, "vision": 39648}


PLANS = {  # free VRAM → (describe_plan(), gpu_bytes, cpu_bytes), 12B int4-g32, 32768 tokens
    None: ("context 32768 tokens, largest image 4096 patches; KV cache 5.00 GiB (0.12 GiB/layer)"
           ", one decoder layer 0.14 GiB\nno CUDA device: everything on the CPU (12.85 GiB of "
           "weights + KV cache)", 0, 13799686144),
    8 << 30: ("context 32768 tokens, largest image 4096 patches; KV cache 5.00 GiB (0.12 GiB/"
              "layer), one decoder layer 0.16 GiB\nGPU: 17/40 decoder layers (23-39) + vision; "
              "weights 3.51 GiB + KV 2.12 GiB + activations 1.68 GiB = 7.31 GiB of 7.35 GiB "
              "usable (8.00 GiB free, margin 0.65 GiB)\nCPU: 23 decoder layers + embeddings, "
              "output; 7.49 GiB of weights + KV cache", 7849322496, 8040699904),
    24 << 30: ("context 32768 tokens, largest image 4096 patches; KV cache 5.00 GiB (0.12 GiB/"
               "layer), one decoder layer 0.16 GiB\nGPU: 40/40 decoder layers (0-39) + vision, "
               "output; weights 7.82 GiB + KV 5.00 GiB + activations 1.68 GiB = 14.50 GiB of "
               "22.55 GiB usable (24.00 GiB free, margin 1.45 GiB)\nCPU: 0 decoder layers + "
               "embeddings; 0.66 GiB of weights + KV cache", 15568896000, 713031680),
}


@pytest.mark.parametrize("free", list(PLANS))
def test_plan_figures_pinned(free):
    e = memory.estimate_bytes(A12, QuantSpec(4, 32))
    p = placement.plan(A12, e, free, 32768, memory.image_tokens(A12))
    assert (describe_plan(p), p.gpu_bytes, p.cpu_bytes) == PLANS[free]


def test_checkpoint_bytes_of_a_quantized_dir_match_the_estimate(tmp_path):
    from pixlocal.checkpoint import open_checkpoint
    from pixlocal.quant import quantize_checkpoint
    from pixlocal.synthetic import write_checkpoint
    src = tmp_path / "src"
    write_checkpoint(src, TINY, fmt="mistral", dtype=torch.bfloat16, seed=1)
    out = tmp_path / "q8"
    quantize_checkpoint(src, out, bits=8)
    got = memory.checkpoint_bytes(open_checkpoint(out, TINY), torch.bfloat16)
    assert got == memory.estimate_bytes(TINY, QuantSpec(8, 32))
    assert sum(got.values()) == 17984064


def test_decode_bytes_per_token_counts_shared_tensors_once():
    from torch import nn
    m = nn.Module()
    m.layers = nn.Linear(4, 3)  # 12 + 3 floats
    m.output = nn.Linear(3, 2, bias=False)
    m.tok_embeddings = nn.Embedding(10, 3)  # skipped: decode reads one row
    t = torch.zeros(5)
    m.layers.register_buffer("a", t)  # one tensor in two places: counted once
    m.output.register_buffer("b", t)
    m.output.register_buffer("none", None)
    m.vision_encoder = nn.Linear(8, 8)  # skipped: not touched by decode
    assert decode_bytes_per_token(m) == 4 * (12 + 3 + 6 + 5)
