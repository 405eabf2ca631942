"""Config and checkpoint loading, and every bad model directory as one clear typed error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pixlocal
from pixlocal.config import PixtralArgs, read_args
from pixlocal.errors import ConfigError, FormatError, ModelNotFound
from pixlocal.shards import SafetensorsFile, save_file


def _copy(src, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def _one_line(e):
    return "\n" not in str(e) and str(e)


def test_params_and_hf_config_give_the_same_args(tiny_args):
    assert PixtralArgs.from_params(tiny_args.to_params()) == tiny_args
    assert PixtralArgs.from_hf_config(tiny_args.to_hf_config()) == tiny_args


def test_unknown_keys_are_ignored_and_missing_keys_named(tmp_path, tiny_args):
    d = {**tiny_args.to_params(), "some_future_key": 1}
    assert PixtralArgs.from_params(d) == tiny_args
    del d["head_dim"], d["n_kv_heads"]
    with pytest.raises(ConfigError, match="params.json: missing required keys head_dim, n_kv"):
        PixtralArgs.from_params(d)


def test_pixtral_12b_params_json_from_the_spec():
    """SPEC §1.1's params.json: head_dim 128 != 5120/32, theta 1e9, 128k context."""
    spec = {"dim": 5120, "n_layers": 40, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
            "n_kv_heads": 8, "rope_theta": 1e9, "norm_eps": 1e-05, "vocab_size": 131072,
            "vision_encoder": {"hidden_size": 1024, "num_channels": 3, "image_size": 1024,
                               "patch_size": 16, "rope_theta": 10000.0,
                               "intermediate_size": 4096, "num_hidden_layers": 24,
                               "num_attention_heads": 16, "image_token_id": 10}}
    assert PixtralArgs.from_params(spec) == PixtralArgs.pixtral_12b()


def test_hf_config_defaults_like_transformers():
    """mistral-community's config.json omits keys equal to transformers' defaults."""
    cfg = {"text_config": {"hidden_size": 5120, "head_dim": 128, "num_hidden_layers": 40,
                           "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
                           "vocab_size": 131072, "max_position_embeddings": 1024000},
           "vision_config": {"hidden_act": "silu", "image_size": 1024, "patch_size": 16,
                             "rope_theta": 10000.0, "head_dim": 64},
           "image_token_index": 10}
    assert PixtralArgs.from_hf_config(cfg) == PixtralArgs.pixtral_12b()
    cfg["vision_config"]["hidden_act"] = "gelu"
    with pytest.raises(ConfigError, match="silu"):
        PixtralArgs.from_hf_config(cfg)


def test_missing_dir_and_dir_without_params(tmp_path):
    with pytest.raises(ModelNotFound, match="nowhere: model directory not found") as e:
        pixlocal.load(tmp_path / "nowhere")
    assert _one_line(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no params.json or config.json") as e:
        pixlocal.load(tmp_path / "empty")
    assert _one_line(e.value)


def test_broken_params_json(tmp_path, tiny_ckpt):
    d = _copy(tiny_ckpt, tmp_path)
    (d / "params.json").write_text("{not json")
    with pytest.raises(ConfigError, match="params.json: unreadable JSON"):
        read_args(d)


def test_missing_weights_and_tokenizer(tmp_path, tiny_ckpt):
    d = _copy(tiny_ckpt, tmp_path)
    (d / "tekken.json").unlink()
    with pytest.raises(FormatError, match="missing tekken.json"):
        pixlocal.load(d)
    (d / "consolidated.safetensors").unlink()
    with pytest.raises(FormatError, match="no weights"):
        pixlocal.load(d)


def test_params_that_disagree_with_the_weights(tmp_path, tiny_ckpt):
    d = _copy(tiny_ckpt, tmp_path)
    p = json.loads((d / "params.json").read_text())
    p["hidden_dim"] += 8
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(FormatError, match=r"feed_forward.w1.weight' has shape .*params.json"):
        pixlocal.load(d)
    p["hidden_dim"] -= 8
    p["n_layers"] += 1
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(FormatError, match="lacks tensor 'layers.2"):
        pixlocal.load(d)


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_safetensors(tmp_path, tiny_ckpt, cut):
    d = _copy(tiny_ckpt, tmp_path)
    f = d / "consolidated.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(FormatError, match="consolidated.safetensors: .*truncated") as e:
        pixlocal.load(d)
    assert _one_line(e.value)


def test_header_that_lies(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(2)}, p)
    raw = bytearray(p.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    for mutate, msg in [
        (lambda h: h["a"].update(dtype="F8_E9"), "unsupported dtype"),
        (lambda h: h["a"].update(shape=[4, 5]), "needs"),
        (lambda h: h["b"].update(data_offsets=[0, 8]), "overlap"),
        (lambda h: h["b"].update(data_offsets=[64, 10**9 + 64 - 56]), "bytes but|truncated"),
    ]:
        h = json.loads(json.dumps(header))
        mutate(h)
        body = json.dumps(h).encode()
        q = tmp_path / "y.safetensors"
        q.write_bytes(len(body).to_bytes(8, "little") + body + bytes(raw[8 + n:]))
        with pytest.raises(FormatError, match=msg):
            SafetensorsFile(q)


def test_weights_are_memory_mapped_not_copied(tmp_path, tiny_args):
    """A bf16 checkpoint loaded as bf16 shares the file's pages (zero-copy)."""
    from pixlocal.synthetic import write_checkpoint
    d = tmp_path / "bf16"
    write_checkpoint(d, tiny_args, fmt="mistral", dtype=torch.bfloat16, seed=0)
    m = pixlocal.load(d, dtype="bfloat16")
    w = m.model.output.weight
    mapped = m.checkpoint.files[0]._mmap
    base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    assert base <= w.data_ptr() < base + len(mapped)
    f32 = pixlocal.load(d, dtype="float32").model.output.weight  # a cast must copy
    assert not (base <= f32.data_ptr() < base + len(mapped))


def test_float32_keeps_vision_weights_mapped_with_the_same_results(tmp_path, tiny_args,
                                                                    sample_png, monkeypatch):
    """float32 compute from a bf16 file: the vision encoder and adapter stay bf16 and mapped
    (CastLinear casts per call), the decoder is converted; the logits equal those of a model
    whose every weight was converted at load (a bf16 → float32 cast is exact)."""
    from pixlocal import loader
    from pixlocal.synthetic import write_checkpoint
    d = tmp_path / "bf16"
    write_checkpoint(d, tiny_args, fmt="mistral", dtype=torch.bfloat16, seed=0)
    m = pixlocal.load(d, dtype="float32")
    vw = m.model.vision_encoder.transformer.layers[0].attention.wq.weight
    mapped = m.checkpoint.files[0]._mmap
    base = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
    assert vw.dtype == torch.bfloat16 and base <= vw.data_ptr() < base + len(mapped)
    assert m.model.output.weight.dtype == torch.float32 and m.dtype == torch.float32
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(sample_png)},
                                         {"type": "text", "text": "Caption this."}]}]
    enc = m.encode(msgs)
    got = m.logits(enc.tokens, enc.images)
    monkeypatch.setattr(loader, "_NARROW_OK", ())
    full = pixlocal.load(d, dtype="float32")
    assert full.model.vision_encoder.transformer.layers[0].attention.wq.weight.dtype == \
        torch.float32
    assert torch.equal(got, full.logits(enc.tokens, enc.images))


def test_dtype_auto(monkeypatch):
    from pixlocal import kernels
    from pixlocal.loader import parse_dtype
    for native, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(kernels, "native_bf16", lambda n=native: n)
        assert parse_dtype("auto", "cpu") == want
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_dtype("auto", "cuda") == torch.bfloat16  # a GPU: bfloat16
    with pytest.raises(pixlocal.PixlocalError, match="unknown dtype 'f8'.*auto"):
        parse_dtype("f8")


def test_load_does_not_import_torch_dynamo(tiny_ckpt):
    """nn.Embedding's init on the meta device imported torch._dynamo: 1.6 s of every load.
    Checked in a fresh process (the test session may have imported it already)."""
    code = ("import sys, pixlocal; pixlocal.load(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tiny_ckpt)], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[-1] == "False"
