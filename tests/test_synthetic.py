"""pixlocal.synthetic: the real formats, deterministic values, atomic output."""

from __future__ import annotations

import json

import pytest
import torch

from pixlocal.checkpoint import open_checkpoint
from pixlocal.config import PixtralArgs, read_args
from pixlocal.synthetic import main, tensor_specs, write_checkpoint


def test_mistral_and_hf_hold_the_same_weights(tmp_path, tiny_args):
    a = write_checkpoint(tmp_path / "m", tiny_args, fmt="mistral", dtype=torch.float32, seed=3)
    b = write_checkpoint(tmp_path / "h", tiny_args, fmt="hf", dtype=torch.float32, seed=3)
    assert sorted(p.name for p in a.iterdir()) == [
        "consolidated.safetensors", "params.json", "tekken.json"]
    assert (b / "config.json").is_file() and (b / "model.safetensors.index.json").is_file()
    assert read_args(a) == read_args(b) == tiny_args
    ca, cb = open_checkpoint(a, tiny_args), open_checkpoint(b, tiny_args)
    assert ca.kind == "mistral" and cb.kind == "hf"
    names = [n for n, _ in tensor_specs(tiny_args)]
    assert sorted(ca.names()) == sorted(cb.names()) == sorted(names)
    for n in names:  # HF rows are permuted on disk and un-permuted on read
        assert torch.equal(ca.get(n), cb.get(n)), n


def test_values_depend_on_seed_and_are_scaled(tmp_path, tiny_args):
    a = write_checkpoint(tmp_path / "a", tiny_args, dtype=torch.float32, seed=0)
    b = write_checkpoint(tmp_path / "b", tiny_args, dtype=torch.float32, seed=1)
    c = write_checkpoint(tmp_path / "c", tiny_args, dtype=torch.float32, seed=0)
    ca, cb, cc = (open_checkpoint(d, tiny_args) for d in (a, b, c))
    w = "layers.0.feed_forward.w2.weight"
    assert torch.equal(ca.get(w), cc.get(w)) and not torch.equal(ca.get(w), cb.get(w))
    assert ca.get(w).std().item() == pytest.approx(tiny_args.hidden_dim ** -0.5, rel=0.1)
    assert ca.get("norm.weight").mean().item() == pytest.approx(1.0, abs=0.1)


def test_bfloat16_and_the_cli(tmp_path, capsys):
    out = tmp_path / "t"
    assert main([str(out), "--preset", "tiny", "--layers", "1", "--vision-layers", "2"]) == 0
    p = json.loads((out / "params.json").read_text())
    assert p["n_layers"] == 1 and p["vision_encoder"]["num_hidden_layers"] == 2
    ck = open_checkpoint(out, PixtralArgs.from_params(p))
    assert ck.dtype("output.weight") == torch.bfloat16
    assert main([str(out)]) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err


def test_nothing_is_left_behind_on_failure(tmp_path, tiny_args, monkeypatch):
    import pixlocal.synthetic as syn

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(syn, "_write_mistral", boom)
    with pytest.raises(OSError):
        write_checkpoint(tmp_path / "x", tiny_args)
    assert list(tmp_path.iterdir()) == []


def test_nemo_shapes_are_the_spec_shapes():
    specs = dict(tensor_specs(PixtralArgs.pixtral_12b(n_layers=1, vision_layers=1)))
    assert specs["tok_embeddings.weight"] == (131072, 5120)
    assert specs["output.weight"] == (131072, 5120)
    assert specs["layers.0.attention.wq.weight"] == (4096, 5120)
    assert specs["layers.0.attention.wk.weight"] == (1024, 5120)
    assert specs["layers.0.feed_forward.w1.weight"] == (14336, 5120)
    assert specs["vision_encoder.patch_conv.weight"] == (1024, 3, 16, 16)
    assert specs["vision_language_adapter.w_in.weight"] == (5120, 1024)
