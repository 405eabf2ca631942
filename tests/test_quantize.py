"""The offline quantizer end to end on tiny synthetic checkpoints: recipe, layout, loading,
CLI, atomicity (a killed run leaves nothing that loads) and every kind of damaged output
reported as one clear line by both `load` and `verify`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from pixlocal.quant import quantize_checkpoint, verify_dir
from pixlocal.quant.recipe import Recipe
from typer.testing import CliRunner

import pixlocal
from pixlocal.checkpoint import QUANT_INDEX, open_checkpoint
from pixlocal.config import read_args
from pixlocal.errors import FormatError, PixlocalError
from pixlocal.qembedding import QEmbedding
from pixlocal.qformat import FORMAT_VERSION, QuantSpec, dequantize
from pixlocal.qlinear import QLinear

SMALL_SHARDS = 4_000_000  # bytes: splits the tiny model (~18 MB quantized) into 4 shards
# QLinear (ref backend, float32 math) vs the same model with dequantized float32 weights: the
# same products summed in another order; observed max |Δlogit| ≈ 2e-6 with O(1) logits
DEQUANT_ORACLE_ATOL = 1e-4

runner = CliRunner()


@pytest.fixture(scope="module")
def src(tmp_path_factory, tiny_args):
    """A bf16 Mistral-format tiny checkpoint (the real checkpoint's dtype)."""
    from pixlocal.synthetic import write_checkpoint
    return write_checkpoint(tmp_path_factory.mktemp("qsrc") / "tiny", tiny_args,
                            dtype=torch.bfloat16, seed=3)


@pytest.fixture(scope="module")
def q4(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4") / "tiny-int4"
    report = quantize_checkpoint(src, out, shard_bytes=SMALL_SHARDS)
    return out, report


def _one_line(e) -> str:
    s = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in s and s
    return s


def test_layout_index_and_metadata(src, q4):
    out, report = q4
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) == 4 and shards[0] == "quantized-00001-of-00004.safetensors"
    assert set(files) == set(shards) | {QUANT_INDEX, "params.json", "tekken.json"}
    assert not [f for f in files if f.startswith(("consolidated", "model"))]
    index = json.loads((out / QUANT_INDEX).read_text())
    md = index["metadata"]
    src_sum = hashlib.sha256((src / "params.json").read_bytes()).hexdigest()
    assert md["format"] == "pixlocal" and md["format_version"] == str(FORMAT_VERSION)
    assert (md["quant"], md["group_size"], md["source"]) == ("int4-g32", "32", src_sum)
    for name, info in index["shards"].items():
        assert (out / name).stat().st_size == info["size"]
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == info["sha256"]
    ckpt = open_checkpoint(out, read_args(out))
    assert ckpt.kind == "pixlocal"
    assert ckpt.files[0].metadata["source"] == src_sum
    assert set(index["weight_map"]) == set(ckpt.names())
    assert int(md["total_size"]) == report.bytes_out == sum(
        i["size"] for i in index["shards"].values())


def test_default_recipe(src, q4):
    out, report = q4
    ckpt = open_checkpoint(out, read_args(out))
    scheme = {t.name: t.scheme for t in report.tensors}
    assert scheme["layers.0.attention.wq.weight"] == "int4-g32"
    assert scheme["layers.1.feed_forward.w2.weight"] == "int4-g32"
    assert scheme["output.weight"] == scheme["tok_embeddings.weight"] == "int8-g32"
    assert scheme["layers.0.attention_norm.weight"] == "bfloat16"
    assert all(s == "bfloat16" for n, s in scheme.items() if n.startswith("vision_"))
    assert ckpt.qtensor("layers.1.attention.wo").spec == QuantSpec(4, 32)
    assert ckpt.qtensor("output").spec == QuantSpec(8, 32)
    assert "vision_encoder.transformer.layers.0.attention.wq.weight" in ckpt
    assert len(ckpt.quantized()) == 2 * 7 + 2


def test_recipe_overrides_and_fallbacks():
    names = [("layers.0.attention.wq.weight", (96, 64)), ("layers.0.feed_forward.w2.weight",
             (64, 96)), ("layers.0.ffn_norm.weight", (64,)), ("layers.1.attention.wq.weight",
             (96, 64)), ("vision_encoder.transformer.layers.0.attention.wq.weight", (32, 32)),
             ("norm.weight", (64,)), ("output.weight", (1000, 64))]
    plan = Recipe.build(4, 64, ["layers.0.*=int8", "vision_encoder.*=int8-g32",
                                "output.weight=float32", "norm.weight=bf16"]).plan(names)
    assert plan["layers.0.attention.wq.weight"] == QuantSpec(8, 64)
    assert plan["layers.0.feed_forward.w2.weight"] == QuantSpec(8, 32)  # 96 % 64: fallback
    assert plan["layers.0.ffn_norm.weight"] is None  # a quantized value skips 1-D tensors
    assert plan["layers.1.attention.wq.weight"] == QuantSpec(4, 64)
    assert plan["vision_encoder.transformer.layers.0.attention.wq.weight"] == QuantSpec(8, 32)
    assert plan["output.weight"] == torch.float32 and plan["norm.weight"] == torch.bfloat16
    with pytest.raises(FormatError, match="matches no"):
        Recipe.build(overrides=["layer.*=int8"]).plan(names)
    with pytest.raises(FormatError, match="not a multiple"):
        Recipe.build(overrides=["layers.0.feed_forward.w2.weight=int4-g64"]).plan(names)
    for bad in ["layers.0.*", "layers.0.*=int3", "x=fp8"]:
        with pytest.raises(FormatError):
            Recipe.build(overrides=[bad])
    with pytest.raises(FormatError):
        Recipe.build(bits=5)


def test_loads_as_qlinear_and_generates(q4, sample_png):
    out, _ = q4
    m = pixlocal.load(out, dtype="float32")
    assert isinstance(m.model.tok_embeddings, QEmbedding)
    assert isinstance(m.model.output, QLinear) and m.model.output.spec.bits == 8
    assert isinstance(m.model.layers[1].feed_forward.w2, QLinear)
    assert m.model.layers[1].feed_forward.w2.spec.bits == 4
    assert not isinstance(m.model.vision_language_adapter.w_in, QLinear)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(sample_png)},
                                         {"type": "text", "text": "What is this?"}]}]
    a = [s.token for s in m.stream(msgs, max_tokens=12)]
    b = [s.token for s in pixlocal.load(out, dtype="float32").stream(msgs, max_tokens=12)]
    assert len(a) == 12 and a == b


def test_quantized_model_equals_its_dequantized_weights(src, q4):
    """The loader's swap is right: same logits as the float model whose weights were
    replaced by dequantize() of the stored tensors (the qmatmul oracle)."""
    out, _ = q4
    q = pixlocal.load(out, dtype="float32")
    for mod in q.model.modules():  # the ref backend is the oracle (fast kernels: test_kernels)
        if isinstance(mod, QLinear):
            mod.backend = "ref"
    ref = pixlocal.load(src, dtype="float32")
    ckpt = open_checkpoint(out, read_args(out))
    mods = dict(ref.model.named_modules())
    for name in ckpt.quantized():
        mods[name].weight = torch.nn.Parameter(dequantize(ckpt.qtensor(name)), False)
    toks = ref.encode([{"role": "user", "content": "Hello there, how are you?"}]).tokens
    lq, lr = q.logits(toks, []), ref.logits(toks, [])
    assert (lq - lr).abs().max().item() < DEQUANT_ORACLE_ATOL


def test_hf_source_gives_the_same_model(tmp_path, tiny_args, src, q4):
    from pixlocal.synthetic import write_checkpoint
    hf = write_checkpoint(tmp_path / "hf", tiny_args, fmt="hf", dtype=torch.bfloat16, seed=3)
    out = tmp_path / "hf-int4"
    quantize_checkpoint(hf, out)
    assert json.loads((out / "params.json").read_text()) == tiny_args.to_params()
    toks = [1, 1000, 1001, 1002, 1003]
    a = pixlocal.load(out, dtype="float32").logits(toks, [])
    b = pixlocal.load(q4[0], dtype="float32").logits(toks, [])
    assert torch.equal(a, b)  # q/k un-permuted before quantizing: bit-identical weights


def test_refuses_existing_output_and_quantized_source(src, q4):
    with pytest.raises(PixlocalError, match="already exists"):
        quantize_checkpoint(src, q4[0])
    with pytest.raises(FormatError, match="already quantized"):
        quantize_checkpoint(q4[0], q4[0].parent / "again")


def test_verify_ok(q4):
    r = verify_dir(q4[0])
    assert (r.quant, r.shards) == ("int4-g32", 4)


# ---- damaged outputs: load and verify each report one clear line -----------------------

def _damaged(q4, tmp_path, how):
    d = tmp_path / "damaged"
    shutil.copytree(q4[0], d)
    index = json.loads((d / QUANT_INDEX).read_text())
    shard = d / sorted(index["shards"])[2]
    if how == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 1000)
    elif how == "missing":
        shard.unlink()
    elif how == "checksum":
        with open(shard, "r+b") as f:  # flip one byte of tensor data; size unchanged
            f.seek(shard.stat().st_size - 10)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    elif how == "version":
        index["metadata"]["format_version"] = str(FORMAT_VERSION + 1)
        (d / QUANT_INDEX).write_text(json.dumps(index))
    return d, shard


@pytest.mark.parametrize("how,load_msg,verify_msg", [
    ("truncated", "truncated", "truncated"),
    ("missing", "missing shard", "missing shard"),
    ("checksum", "sha256", "sha256"),  # the first load hashes (pixlocal/integrity.py)
    ("version", "re-quantize", "re-quantize"),
])
def test_damage_is_one_clear_line(q4, tmp_path, how, load_msg, verify_msg):
    d, shard = _damaged(q4, tmp_path, how)
    named = QUANT_INDEX if how == "version" else shard.name
    with pytest.raises(FormatError) as e:
        pixlocal.load(d, dtype="float32")
    assert load_msg in _one_line(e) and named in str(e.value)
    with pytest.raises(FormatError) as e:
        verify_dir(d)
    assert verify_msg in _one_line(e) and named in str(e.value)
    r = runner.invoke(_app(), ["verify", str(d)])
    assert r.exit_code == 1 and verify_msg in r.stderr and named in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout


def test_unknown_version_in_a_shard_header(q4, tmp_path):
    from pixlocal.shards import SafetensorsFile, save_file
    d = tmp_path / "v"
    shutil.copytree(q4[0], d)
    p = d / "quantized-00001-of-00004.safetensors"
    f = SafetensorsFile(p)
    tensors = {k: f.get(k).clone() for k in f.keys()}
    md = {**f.metadata, "format_version": "99"}
    del f
    save_file(tensors, p, md)
    index = json.loads((d / QUANT_INDEX).read_text())
    index["shards"][p.name]["size"] = p.stat().st_size
    (d / QUANT_INDEX).write_text(json.dumps(index))
    for check in (lambda: pixlocal.load(d), lambda: verify_dir(d)):
        with pytest.raises(FormatError) as e:
            check()
        assert "format_version 99" in _one_line(e) and p.name in str(e.value)


# ---- CLI ----------------------------------------------------------------------------------

def _app():
    from pixlocal.cli import ask as _ask  # noqa: F401
    from pixlocal.cli import quantize as _  # noqa: F401  (registers quantize and verify)
    from pixlocal.cli.app import app
    return app


def test_cli_quantize_verify_and_ask(src, tmp_path, sample_png):
    out = tmp_path / "cli-int8"
    r = runner.invoke(_app(), ["quantize", str(src), str(out), "--bits", "8", "--group-size",
                               "64", "--set", "vision_encoder.*=float32"],
                      env={"COLUMNS": "120"}, catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(out)
    for word in ("attention", "int8-g64", "int8-g32", "output head", "float32", "MB/s"):
        assert word in r.stderr, word
    ckpt = open_checkpoint(out, read_args(out))
    assert ckpt.qtensor("layers.0.attention.wq").spec == QuantSpec(8, 64)
    assert ckpt.dtype("vision_encoder.transformer.layers.0.attention.wq.weight") == torch.float32
    r = runner.invoke(_app(), ["verify", str(out)], catch_exceptions=False)
    assert r.exit_code == 0 and r.stdout.startswith("OK ") and "int8-g64" in r.stdout
    r = runner.invoke(_app(), ["ask", str(sample_png), "Describe the image.", "-m", str(out),
                               "--max-tokens", "6", "--dtype", "float32"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr and "tok/s" not in r.stdout


def test_cli_bad_arguments(src, tmp_path):
    r = runner.invoke(_app(), ["quantize", str(src), str(tmp_path / "o"), "--bits", "5"])
    assert r.exit_code == 2 and "4, 8" in r.stderr
    r = runner.invoke(_app(), ["quantize", str(src), str(tmp_path / "o"), "--set", "nope=int8"])
    assert r.exit_code == 1 and "matches no" in r.stderr and not (tmp_path / "o").exists()
    r = runner.invoke(_app(), ["verify", str(src)])
    assert r.exit_code == 1 and "not a pixlocal quantized model" in r.stderr


# ---- a killed run leaves nothing that loads; the rerun succeeds and cleans up ---------------

def test_killed_run_leaves_nothing_and_rerun_succeeds(src, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "import sys; from pixlocal.cli.app import main; "
           "sys.argv[0] = 'pixlocal'; main()", "quantize", str(src), str(out), "--shard-mb", "4"]
    env = {**os.environ, "PIXLOCAL_QUANTIZE_SLOW": "0.2"}  # 66 tensors: ~13 s in all
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("killed.partial-*/quantized-00002-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "never got to shard 2"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert not out.exists()
    stale = list(tmp_path.glob("killed.partial-*"))
    assert len(stale) == 1
    for d in (out, stale[0]):
        with pytest.raises(PixlocalError):
            pixlocal.load(d)
    quantize_checkpoint(src, out, shard_bytes=SMALL_SHARDS)
    assert not list(tmp_path.glob("killed.partial-*"))  # the dead run's dir was removed
    verify_dir(out)
    assert pixlocal.load(out).generate([{"role": "user", "content": "hi"}], max_tokens=2)
