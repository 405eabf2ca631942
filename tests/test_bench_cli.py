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


def test_bench_missing_model(tmp_path):
    from pixlocal.cli import bench  # noqa: F401
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.stdout == "" and "nope" in r.stderr
