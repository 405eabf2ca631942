"""Model-level quality of the quantized format: greedy-token agreement and KL against the
unquantized bf16 checkpoint, over 256 greedy steps of a tiny synthetic model.

Method: the bf16 model decodes 256 tokens greedily (with its KV cache); then the prompt plus
those tokens go through each model in one teacher-forced forward, and at each of the 256
positions we compare the argmax (top-1 agreement) and KL(bf16 || quantized). Both models run
in float32 so the figure is the weights' quantization alone, not bf16 activation rounding
(printed too, for reference). Quantized matmuls run on the `ref` backend (dequantize, then
float32 matmul), so this measures the format; the fast kernels are held to `ref` by
test_kernels.

Why a "peaked" tiny model: with random Gaussian weights the head's 131,072 logits are
i.i.d.-like and the top-2 gap is tiny (extreme-value statistics: median 0.16 logit std on the
seed-0 tiny model), so int8 flips 2-3% of argmaxes and even bf16 rounding of the logits flips
some; a trained LM's next-token choice is rarely such a coin toss. So the test's checkpoint
keeps every random decoder/vision weight but sets the output head to a permuted copy of the
embedding table (÷4): a confident "bigram" model whose residual stream still passes through
two random (and quantized) decoder layers. On it the median top-2 gap is ~10x larger. Both
models' figures are printed (run with -s).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pixlocal.quant import quantize_checkpoint

import pixlocal
from pixlocal.qlinear import QLinear
from pixlocal.shards import SafetensorsFile, save_file

STEPS = 256
INT8_MIN_AGREEMENT = 0.99  # the bound (observed 0.996: 1 flip in 256)
INT8_MAX_MEAN_KL = 1e-3  # nats; observed 2e-4 on the peaked model
INT4_MAX_MEAN_KL = 0.05  # nats; observed 2e-2 on the peaked model (reported, not a goal)
PROMPT = [{"role": "user", "content": "Tell me a story about a cat who learns to sail."}]


def _peaked(path) -> None:
    f = SafetensorsFile(path / "consolidated.safetensors")
    sd = {k: f.get(k).clone() for k in f.keys()}
    del f
    emb = sd["tok_embeddings.weight"].float()
    perm = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))
    sd["output.weight"] = (emb[perm] / 4).to(sd["output.weight"].dtype)
    save_file(sd, path / "consolidated.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_args):
    from pixlocal.synthetic import write_checkpoint
    root = tmp_path_factory.mktemp("qmodel")
    out = {}
    for kind in ("peaked", "random"):
        src = write_checkpoint(root / kind, tiny_args, dtype=torch.bfloat16, seed=1)
        if kind == "peaked":
            _peaked(src)
        out[kind] = {"bf16": src}
        for bits in (8, 4):
            out[kind][f"int{bits}"] = root / f"{kind}-int{bits}"
            quantize_checkpoint(src, out[kind][f"int{bits}"], bits=bits)
    return out


def _greedy(src) -> tuple[list[int], int]:
    """The bf16 checkpoint's greedy continuation (float32 compute, KV cache): (prompt + STEPS
    tokens, prompt length)."""
    ref = pixlocal.load(src, dtype="float32")
    enc = ref.encode(PROMPT)
    logits, toks = ref.prefill(enc), list(enc.tokens)
    for _ in range(STEPS):
        toks.append(int(logits.argmax()))
        logits = ref.decode(toks[-1])
    return toks, len(enc.tokens)


def _measure(dirs: dict, toks: list[int], n: int, dtype: str) -> dict[str, tuple[float, float]]:
    """{variant: (top-1 agreement, mean KL)} against the bf16 checkpoint over the STEPS
    positions of `toks`, teacher-forced, all run in `dtype`."""
    r = pixlocal.load(dirs["bf16"], dtype=dtype).logits(toks, [])[n - 1:-1].float()  # (STEPS, V)
    res = {}
    for v in ("int8", "int4"):
        m = pixlocal.load(dirs[v], dtype=dtype)
        for mod in m.model.modules():  # the format's quality, through the oracle kernel
            if isinstance(mod, QLinear):
                mod.backend = "ref"
        q = m.logits(toks, [])[n - 1:-1].float()
        agree = (q.argmax(-1) == r.argmax(-1)).float().mean().item()
        kl = F.kl_div(q.log_softmax(-1), r.log_softmax(-1), log_target=True,
                      reduction="none").sum(-1).mean().item()
        res[v] = (agree, kl)
    return res


def test_int8_agrees_with_bf16_and_int4_is_measured(models):
    rows = []
    for kind in ("peaked", "random"):
        toks, n = _greedy(models[kind]["bf16"])
        for dtype in ("float32", "bfloat16"):
            for v, (agree, kl) in _measure(models[kind], toks, n, dtype).items():
                rows.append((kind, dtype, v, agree, kl))
    print(f"\n{STEPS} greedy steps of the bf16 checkpoint, teacher-forced (tiny model)\n"
          f"  {'model':<8}{'compute':<10}{'weights':<9}{'top-1 agree':>12}{'mean KL':>11}")
    for kind, dtype, v, agree, kl in rows:
        print(f"  {kind:<8}{dtype:<10}{v:<9}{agree:>12.4f}{kl:>11.2e}")
    got = {(k, d, v): (a, kl) for k, d, v, a, kl in rows}
    agree8, kl8 = got[("peaked", "float32", "int8")]
    assert agree8 >= INT8_MIN_AGREEMENT and kl8 <= INT8_MAX_MEAN_KL
    assert got[("peaked", "float32", "int4")][1] <= INT4_MAX_MEAN_KL
    assert got[("peaked", "float32", "int4")][1] > kl8  # int4 measurably coarser than int8
