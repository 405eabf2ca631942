"""Memory plan and CPU/GPU split: 12B arithmetic, explicit/auto layer counts, apply() on CPU."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from pixlocal import memory, placement
from pixlocal.qlinear import QLinear
from pixlocal.cli.doctor import describe_plan
from pixlocal.config import PixtralArgs
from pixlocal.errors import ContextOverflow, PixlocalError
from pixlocal.qformat import QuantSpec

GiB = placement.GiB
A12 = PixtralArgs.pixtral_12b()


@pytest.fixture(scope="module")
def int4_12b() -> dict[str, int]:
    return memory.estimate_bytes(A12, QuantSpec(4, 32))


def test_12b_int4_estimate_is_what_the_format_says(int4_12b):
    layer = sum(b for n, b in int4_12b.items() if n.startswith("layers.0."))
    linears = 4 * 5120 * 4096 // 4 * 2 + 2 * 5120 * 1024 + 3 * 5120 * 14336  # weights/layer
    assert abs(layer - linears * 4.5 / 8) < 5 * 5120 * 2  # + two norms in bf16
    assert int4_12b["output.qweight"] == 131072 * 5120  # int8 head
    total = sum(int4_12b.values()) / GiB
    assert 7.5 < total < 8.2, total  # 12.4B weights, mostly at 4.5 bits


def test_8gb_card_runs_int4_12b_partially(int4_12b):
    free = int(7.4 * GiB)  # what an 8 GB card reports free with a desktop on it
    p = placement.plan(A12, int4_12b, free, 8192, memory.image_tokens(A12))
    assert 15 <= len(p.gpu_layers) < 40
    assert p.gpu_layers == list(range(40 - len(p.gpu_layers), 40))  # the last layers
    assert p.devices["vision"] == "cuda" and p.devices["embeddings"] == "cpu"
    assert p.devices["output"] == "cpu"  # the head follows only once every layer is there
    assert p.gpu_bytes <= p.budget <= free
    # one more layer would not have fitted
    more = placement.plan(A12, int4_12b, free + 1 * GiB, 8192, 4096)
    assert len(more.gpu_layers) > len(p.gpu_layers)
    text = describe_plan(p)
    assert f"{len(p.gpu_layers)}/40 decoder layers" in text and "GiB free" in text


def test_24gb_card_holds_everything_and_context_costs_layers(int4_12b):
    p = placement.plan(A12, int4_12b, 22 * GiB, 32768, 4096)
    assert len(p.gpu_layers) == 40 and p.devices["output"] == "cuda"
    assert p.kv_per_layer == 2 * 8 * 128 * 32768 * 2
    short = placement.plan(A12, int4_12b, 10 * GiB, 4096, 4096)
    long = placement.plan(A12, int4_12b, 10 * GiB, 65536, 4096)
    assert len(long.gpu_layers) < len(short.gpu_layers)


def test_max_vram_caps_the_plan(int4_12b):
    """--max-vram is a ceiling: the margin (allocator fragmentation, cuBLAS workspace) sits
    inside it, not on top of it."""
    p = placement.plan(A12, int4_12b, 22 * GiB, 8192, 4096, max_vram=3 * GiB)
    assert p.margin >= placement.MARGIN_FIXED and p.budget == 3 * GiB - p.margin
    assert p.gpu_bytes + p.margin <= 3 * GiB and 0 < len(p.gpu_layers) < 40
    roomy = placement.plan(A12, int4_12b, 22 * GiB, 8192, 4096)
    assert roomy.margin > p.margin  # a fraction of what the plan may use


def test_max_vram_caps_the_allocator_too(four_layers, monkeypatch):
    """Past the plan, torch's caching allocator is capped at --max-vram on the GPU (its
    fraction of the card), so a tensor nobody planned for fails there, not the card."""
    from types import SimpleNamespace

    from pixlocal import loader
    from pixlocal.kernels import backend
    got = []
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(total_memory=8 * GiB))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda f, d=None: got.append((f, d)))
    assert backend.limit_vram("cuda:0", 2 * GiB) == 0.25
    assert got == [(0.25, torch.device("cuda:0"))]
    got.clear()
    monkeypatch.setattr(loader, "is_gpu", lambda d: True)  # the GPU side: the CPU, here
    monkeypatch.setattr(loader, "limit_vram", lambda d, b: got.append((d, b)))
    loader.load(four_layers, "cpu", "float32", gpu="cpu", gpu_free=10 * GiB, max_vram=GiB,
                backends={"cuda": "ref", "cpu": "ref"})
    assert got == [(torch.device("cpu"), GiB)]


def test_the_plan_counts_int4_as_the_gpu_holds_it(int4_12b):
    """tinygemm widens int4's scale and zero codes (2 bytes a group) to a bf16 pair (4);
    where the GPU has no tinygemm (below 8.0, ROCm) the stored layout stays, and the
    0.68 GB the pairs would take go to more layers on an 8 GB card."""
    free = int(7.4 * GiB)
    pairs = placement.plan(A12, int4_12b, free, 8192, 4096)
    stored = placement.plan(A12, int4_12b, free, 8192, 4096, int4_pairs=False)
    zeros = sum(b for n, b in int4_12b.items() if n.startswith("layers.0.") and
                n.endswith(".zeros"))
    assert pairs.weights["layers.39"] == stored.weights["layers.39"] + 2 * zeros
    assert len(stored.gpu_layers) > len(pairs.gpu_layers)


def test_the_plan_names_its_devices(int4_12b):
    """bench and the GPU smoke test print where the decoder runs from the plan (the
    embeddings always sit on the CPU: they said "cpu" for every run)."""
    assert placement.plan(A12, int4_12b, None, 8192, 4096).label == "cpu"
    assert placement.plan(A12, int4_12b, 22 * GiB, 8192, 4096).label == "cuda 40/40 layers"
    part = placement.plan(A12, int4_12b, int(7.4 * GiB), 8192, 4096)
    assert part.label == f"cpu+cuda {len(part.gpu_layers)}/40 layers"
    assert placement.plan(A12, int4_12b, 22 * GiB, 8192, 4096,
                          gpu_layers=0).label == "cpu+cuda 0/40 layers"  # vision on the GPU


def test_explicit_gpu_layers_that_do_not_fit_are_refused_with_a_count_that_does(int4_12b):
    with pytest.raises(PixlocalError, match=r"--gpu-layers 40 needs .* GiB") as e:
        placement.plan(A12, int4_12b, int(7.4 * GiB), 8192, 4096, gpu_layers=40)
    assert "\n" not in str(e.value)
    most = int(re.search(r"use --gpu-layers (\d+)", str(e.value))[1])
    ok = placement.plan(A12, int4_12b, int(7.4 * GiB), 8192, 4096, gpu_layers=most)
    assert len(ok.gpu_layers) == most and ok.gpu_bytes <= ok.budget
    for bad in (-1, 41, "some"):
        with pytest.raises(PixlocalError, match="expected auto or 0..40"):
            placement.plan(A12, int4_12b, GiB, 8192, 4096, gpu_layers=bad)  # type: ignore[arg-type]


def test_no_cuda_means_everything_on_the_cpu(int4_12b):
    p = placement.plan(A12, int4_12b, None, 8192, 4096)
    assert set(p.devices.values()) == {"cpu"} and p.gpu_layers == [] and p.gpu_bytes == 0
    assert "no CUDA device" in describe_plan(p)
    tiny_gpu = placement.plan(A12, int4_12b, GiB // 2, 8192, 4096)
    assert tiny_gpu.gpu_layers == [] and tiny_gpu.devices["vision"] == "cpu"


def test_unknown_tensor_has_no_part():
    with pytest.raises(PixlocalError, match="no known part"):
        placement.part_of("lm_head.weight")


def test_checkpoint_bytes_match_the_estimate(tmp_path, tiny_args):
    from pixlocal.quant import quantize_checkpoint

    from pixlocal.checkpoint import open_checkpoint
    from pixlocal.synthetic import write_checkpoint
    src, out = tmp_path / "src", tmp_path / "q"
    write_checkpoint(src, tiny_args, fmt="mistral", dtype=torch.bfloat16, seed=0)
    quantize_checkpoint(src, out, bits=4)
    got = memory.checkpoint_bytes(open_checkpoint(out, tiny_args), torch.bfloat16)
    assert got == memory.estimate_bytes(tiny_args, QuantSpec(4, 32))
    plain = memory.checkpoint_bytes(open_checkpoint(src, tiny_args), torch.float32)
    assert plain == memory.estimate_bytes(tiny_args, None, torch.float32)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from pixlocal.quant import quantize_checkpoint

    from pixlocal.synthetic import write_checkpoint
    d = tmp_path_factory.mktemp("split")
    args = dataclasses.replace(PixtralArgs.tiny(), n_layers=4)
    write_checkpoint(d / "src", args, fmt="mistral", dtype=torch.float32, seed=3)
    quantize_checkpoint(d / "src", d / "q", bits=4)
    return d / "q"


def _split(path, encoder, backends, gpu_layers=2):
    """A runner whose plan puts the last `gpu_layers` layers and the vision tower on "the GPU",
    here the CPU with the given backends (the cuda backend's CPU twins stand in)."""
    from pixlocal import loader
    from pixlocal.generate import Pixtral
    loaded = loader.load(path, "cpu", "float32", context_len=256, gpu_layers=gpu_layers,
                         gpu="cpu", gpu_free=10 * GiB, backends=backends)
    return Pixtral(loaded, encoder, path)


def test_the_plan_splits_layers_and_the_forward_matches(four_layers, sample_png):
    import pixlocal
    whole = pixlocal.load(four_layers, device="cpu", dtype="float32")
    ref = _split(four_layers, whole.encoder, {"cuda": "ref", "cpu": "ref"}, gpu_layers=0)
    split = _split(four_layers, whole.encoder, {"cuda": "cuda", "cpu": "ref"})
    assert split.plan.gpu_layers == [2, 3] and split.plan.devices["vision"] == "cuda"
    # both "devices" are the CPU here; the backends show which side each module landed on
    backend = {n: m.backend.name for n, m in split.model.named_modules()
               if isinstance(m, QLinear)}
    assert {backend[f"layers.{i}.feed_forward.w1"] for i in (2, 3)} == {"cuda"}
    assert {backend[f"layers.{i}.attention.wq"] for i in (0, 1)} == {"ref"}
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(sample_png)},
                                         {"type": "text", "text": "What is it?"}]}]
    enc = whole.encode(msgs)
    want = ref.logits(enc.tokens, enc.images)
    # the cuda backend's CPU twins: bf16 activations and bf16 zero points (test_cuda_logic)
    got = split.logits(enc.tokens, enc.images)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2
    # the split itself changes nothing: same backend on both sides, same numbers and tokens
    same = _split(four_layers, whole.encoder, {"cuda": "ref", "cpu": "ref"})
    torch.testing.assert_close(same.logits(enc.tokens, enc.images), want, rtol=0, atol=0)
    assert same.generate(msgs, max_tokens=6) == ref.generate(msgs, max_tokens=6)


def test_a_partial_offload_keeps_the_fast_cpu_decode_for_its_cpu_layers(four_layers,
                                                                         sample_png):
    """The CPU layers of a split decode through the cpu backend's whole-layer kernel
    (fastdecode), the GPU layers after them as modules: it was off for every layer as soon
    as one sat on the GPU. Same tokens and logits as the module path."""
    import pixlocal
    from pixlocal import kernels
    if kernels.default_backend("cpu") != "cpu":
        pytest.skip("the cpu backend needs numba and AVX2")
    enc = pixlocal.load(four_layers, device="cpu", dtype="float32").encoder
    m = _split(four_layers, enc, {"cuda": "cuda", "cpu": "cpu"})
    assert m.fast_decode is not None and m.fast_decode.n == 2  # layers 0 and 1
    msgs = [{"role": "user", "content": "Tell me a story about a cat"}]
    e = m.encode(msgs)
    m.prefill(e)
    fast = [m.decode(t) for t in (1001, 1002, 1003)]
    steps = []
    real = m.fast_decode.stack
    m.fast_decode.stack = lambda *a: steps.append(1) or real(*a)
    m.reset()
    m.prefill(e)
    assert torch.equal(m.decode(1001), fast[0]) and steps == [1]
    slow, m.fast_decode = m.fast_decode, None  # the module path for every layer
    m.reset()
    m.prefill(e)
    for t, want in zip((1001, 1002, 1003), fast, strict=True):
        torch.testing.assert_close(m.decode(t), want, rtol=1e-4, atol=1e-4)
    assert slow is not None


def test_below_compute_capability_8_the_vision_tower_runs_in_fp16(four_layers, sample_png,
                                                                   monkeypatch):
    """A bfloat16 load on a GPU below 8.0 (capability mocked on the cuda backend's CPU
    twins) puts the vision encoder and adapter in float16, and the images are cast on their
    way in; the decoder's residual stream and KV cache keep bfloat16 (their GEMMs and
    attention cast per call). The answer matches a float32 reference."""
    import pixlocal
    from pixlocal.kernels import cuda
    whole = pixlocal.load(four_layers, device="cpu", dtype="float32")
    monkeypatch.setattr(cuda, "capability", lambda d: (7, 5))
    from pixlocal import loader
    from pixlocal.generate import Pixtral
    loaded = loader.load(four_layers, "cpu", "bfloat16", context_len=256, gpu_layers=2,
                         gpu="cpu", gpu_free=10 * GiB, backends={"cuda": "cuda", "cpu": "ref"})
    m = Pixtral(loaded, whole.encoder, four_layers)
    # no tinygemm below 8.0: the GPU layers keep the stored int4 layout, and the plan counts
    # it (not tinygemm's 4-byte pairs per group)
    stored = memory.checkpoint_bytes(m.checkpoint, torch.bfloat16)
    assert loaded.plan.weights["layers.3"] == sum(b for n, b in stored.items()
                                                  if n.startswith("layers.3."))
    dtypes = {n: p.dtype for n, p in m.model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.startswith("vision_")} == {torch.float16}
    assert dtypes["layers.3.attention_norm.weight"] == torch.bfloat16
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(sample_png)},
                                         {"type": "text", "text": "What is it?"}]}]
    enc = whole.encode(msgs)
    want = whole.image_features(enc.images)
    got = m.image_features(enc.images)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2
    logits = m.logits(enc.tokens, enc.images)
    ref = whole.logits(enc.tokens, enc.images)
    assert bool(torch.isfinite(logits).all())
    assert float((logits - ref).abs().max() / ref.abs().max()) < 5e-2  # bf16 residual stream


def test_every_gpu_layer_weight_is_prepared_at_load(four_layers):
    """Each GPU-layer QLinear is built with the cuda backend and packed for tinygemm by the
    load itself (before any forward), its stored int4 tensors released; the CPU layers are
    prepared for theirs."""
    import pixlocal
    from pixlocal.kernels.cuda import TinyGemmQTensor
    enc = pixlocal.load(four_layers, device="cpu", dtype="float32").encoder
    m = _split(four_layers, enc, {"cuda": "cuda", "cpu": "ref"})
    for name, mod in m.model.named_modules():
        if not isinstance(mod, QLinear):
            continue
        assert mod._prepared is not None, name  # prepared already: nothing ran yet
        gpu = name.startswith(("layers.2.", "layers.3."))
        assert isinstance(mod._prepared[1], TinyGemmQTensor) == gpu, name
        assert mod.backend.name == ("cuda" if gpu else "ref"), name


def test_a_forced_backend_that_cannot_run_a_device_is_one_line(four_layers, monkeypatch):
    """PIXLOCAL_BACKEND=cpu where the plan puts layers on a GPU, or a backend that does not
    exist: a PixlocalError naming the variable, never a traceback from deep in the load."""
    from pixlocal import loader
    monkeypatch.setenv("PIXLOCAL_BACKEND", "cpu")
    with pytest.raises(PixlocalError, match="PIXLOCAL_BACKEND=cpu cannot run") as e:
        loader.load(four_layers, "cpu", "float32", gpu=torch.device("meta"),
                    gpu_free=10 * GiB, gpu_layers=2)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("PIXLOCAL_BACKEND", "nonsense")
    with pytest.raises(PixlocalError, match="PIXLOCAL_BACKEND='nonsense'"):
        loader.load(four_layers, "cpu", "float32")
    monkeypatch.setenv("PIXLOCAL_BACKEND", "ref")  # runs anywhere
    m = loader.load(four_layers, "cpu", "float32")
    assert {q.backend.name for q in m.model.modules() if isinstance(q, QLinear)} == {"ref"}


def test_kv_cache_lives_per_layer_on_a_device_list():
    from pixlocal.model import KVCache
    devs = [torch.device("cpu")] * 3
    c = KVCache(3, 2, 8, 4, torch.float32, devs)
    c.k[1][:, :4] = 1.0
    c.grow(10)
    assert c.capacity == 10 and len(c.k) == 3 and c.k[1].shape == (2, 10, 8)
    assert float(c.k[1][:, :4].min()) == 1.0 and float(c.k[1][:, 4:].abs().max()) == 0.0
    assert c.nbytes == 2 * 3 * 2 * 10 * 8 * 4


def test_planned_context_is_enforced(tiny_ckpt):
    import pixlocal
    m = pixlocal.load(tiny_ckpt, device="cpu", dtype="float32")
    m.context_len = 16  # what load() sets from a GPU plan
    with pytest.raises(ContextOverflow):
        list(m.stream([{"role": "user", "content": "hello " * 20}], max_tokens=4))


def test_device_auto_without_cuda_is_the_cpu(tiny_ckpt, monkeypatch):
    import pixlocal
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    m = pixlocal.load(tiny_ckpt, dtype="float32")  # device="auto" is the default
    assert m.device.type == "cpu" and m.plan.gpu_layers == [] and m.plan.free_vram is None
    with pytest.raises(PixlocalError, match="no CUDA device"):
        pixlocal.load(tiny_ckpt, device="cuda")
