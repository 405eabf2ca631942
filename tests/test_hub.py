"""pixlocal.cli.hub from Python, against the stand-in hub (tests/hub_server.py; HF_ENDPOINT is read
by huggingface_hub at import, so each pull runs in a subprocess): the events the CLI draws,
the path returned, the quantizer passed in, and shards named by a pattern after their index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import cli_fixtures
from hub_server import Hub

tiny_registry = cli_fixtures.tiny_registry  # a fixture
FILES = cli_fixtures.FILES
hub = cli_fixtures.hub  # a fixture: the tiny model served as acme/big

SCRIPT = textwrap.dedent("""
    import json, shutil, sys
    from pixlocal.cli import hub
    from pixlocal.errors import PixlocalError
    name, quant, source, fake_quantizer = sys.argv[1:5]
    events = []
    def on_event(ev):
        if ev.what != "bytes" or ev.done == ev.total:
            events.append({"what": ev.what, "name": ev.name, "index": ev.index,
                           "count": ev.count, "done": ev.done, "total": ev.total,
                           "path": None if ev.path is None else str(ev.path)})
    def quantize(src, out, bits):
        events.append({"what": "quantize", "bits": bits})
        shutil.copytree(src, out)
    try:
        out = hub.pull(name, quant=None if quant == "-" else quant, source=source,
                       on_event=on_event, quantize=quantize if fake_quantizer == "1" else None)
        print(json.dumps({"path": str(out), "events": events}))
    except PixlocalError as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}", "events": events}))
""")


def pull(endpoint, tmp_path, name="big", quant="-", source="mistral", quantizer=False) -> dict:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5",
           "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    env.pop("HF_TOKEN", None)
    r = subprocess.run([sys.executable, "-c", SCRIPT, name, quant, source,
                        "1" if quantizer else "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_pull_reports_events_and_returns_the_path(tiny_registry, tiny_ckpt, hub, tmp_path):
    from pixlocal.config import home
    d = pull(hub.endpoint, tmp_path, quant="none")
    assert d["path"] == str(home() / "big")
    files = [e for e in d["events"] if e["what"] == "file"]
    assert [(e["name"], e["index"], e["count"]) for e in files] == [
        (f, i, 3) for i, f in enumerate(FILES, 1)]
    done = {e["name"]: e["done"] for e in d["events"] if e["what"] == "bytes"}
    assert done == {f: (tiny_ckpt / f).stat().st_size for f in FILES}
    assert d["events"][-1] == {"what": "downloaded", "name": "", "index": 0, "count": 0,
                               "done": 0, "total": None, "path": str(home() / "big")}


def test_a_quantized_variant_needs_the_quantizer_passed_in(tiny_registry, hub, tmp_path):
    from pixlocal.config import home
    d = pull(hub.endpoint, tmp_path)  # the default variant is int4
    assert d["error"].startswith("PixlocalError") and "quantize=" in d["error"]
    d = pull(hub.endpoint, tmp_path, quantizer=True)
    assert d["path"] == str(home() / "big-int4")
    assert {"what": "quantize", "bits": 4} in d["events"]
    d = pull(hub.endpoint, tmp_path, quantizer=True)  # there already: not made again
    assert d["events"][-1]["what"] == "present" and d["events"][-1]["name"] == "big:int4"
    assert not any(e["what"] == "quantize" for e in d["events"])
    d = pull(hub.endpoint, tmp_path, name="nope")
    assert d["error"].startswith("ModelNotFound: unknown model 'nope'")


def test_pattern_names_the_shards_of_an_index_fetched_before_it(tmp_path, monkeypatch):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.dumps({"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}})
    h = Hub(repos={"acme/hf": {"config.json": b"{}", "model.safetensors.index.json":
                               index.encode(), shards[0]: b"x" * 10, shards[1]: b"y" * 20}})
    endpoint = h.start()
    try:
        reg = tmp_path / "models.toml"
        reg.write_text('[models.hf]\nhf_upstream = "acme/hf"\nhf_files = ["config.json", '
                       '"model.safetensors.index.json", "model-*.safetensors"]\n'
                       'variants.bf16 = { path = "${PIXLOCAL_HOME}/hf" }\n')
        monkeypatch.setenv("PIXLOCAL_MODELS_TOML", str(reg))
        d = pull(endpoint, tmp_path, name="hf", quant="none", source="hf")
    finally:
        h.stop()
    assert "error" not in d, d
    files = [(e["name"], e["index"], e["count"]) for e in d["events"] if e["what"] == "file"]
    # the count grows once the index names the shards (no hub API listing)
    assert files == [("config.json", 1, 2), ("model.safetensors.index.json", 2, 2),
                     (shards[0], 3, 4), (shards[1], 4, 4)]
    assert d["events"][-1]["what"] == "downloaded"
