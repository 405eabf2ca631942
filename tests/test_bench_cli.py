"""`pixlocal bench`: the llama-bench-style figures, as JSON on stdout."""

from __future__ import annotations

import json

from pixlocal.cli.app import app
from typer.testing import CliRunner


def test_bench_json(tiny_ckpt, sample_png):
    from pixlocal.cli import bench  # noqa: F401  (registers the command)
    r = CliRunner().invoke(app, ["bench", str(tiny_ckpt), "-p", "16", "-n", "4", "-r", "1",
                                 "--json", "--dtype", "float32"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    for k in ("load_s", "prefill_tps", "decode_tps", "effective_gbps", "peak_rss_bytes"):
        assert d[k] > 0, k
    assert d["n_prompt"] == 16 and d["n_gen"] == 4
    # bytes per decode step: every decoder weight + norm + head, in float32
    a = d["decode_bytes_per_token"]
    # per layer: wq 96×64, wk and wv 48×64, wo 64×96, w1/w2/w3 96×64, two norms of 64
    per_layer = 96 * 64 + 2 * 48 * 64 + 64 * 96 + 3 * 96 * 64 + 2 * 64
    assert a == 4 * (2 * per_layer + 64 + 131072 * 64)
    r = CliRunner().invoke(app, ["bench", str(tiny_ckpt), "--image", str(sample_png), "-n",
                                 "2", "-r", "1", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["images"] == 1


def test_bench_times_after_the_gpu_finishes_and_names_the_plan(tiny_ckpt, monkeypatch):
    """GPU kernels run asynchronously: every clock read waits for the devices first
    (backend.synchronize); the run is labelled from the plan, not the embeddings' device
    (always the CPU). The split here is the cuda backend's CPU twins standing in."""
    from pixlocal.cli.bench import run_bench

    import pixlocal
    from pixlocal import loader
    from pixlocal.generate import Pixtral
    from pixlocal.kernels import backend
    enc = pixlocal.load(tiny_ckpt, device="cpu", dtype="float32").encoder

    def split(path, **kw):
        loaded = loader.load(path, "cpu", "float32", gpu_layers=1, gpu="cpu",
                             gpu_free=2**33, backends={"cuda": "cuda", "cpu": "ref"})
        return Pixtral(loaded, enc, tiny_ckpt)
    monkeypatch.setattr(pixlocal, "load", split)
    synced = []
    monkeypatch.setattr(backend, "synchronize", lambda devs: synced.append(set(devs)))
    r = run_bench(str(tiny_ckpt), n_prompt=8, n_gen=2, image=None, reps=2, device="cpu",
                  dtype="float32", max_image_size=None)
    assert r["device"] == "cpu+cuda 1/2 layers"
    assert len(synced) == 2 + 2 * 4  # warm-up start/end, and prefill and decode per rep
    assert r["decode_bytes_per_token"] > 0


def test_bench_missing_model(tmp_path):
    from pixlocal.cli import bench  # noqa: F401
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stdout == "" and "nope" in r.stderr
