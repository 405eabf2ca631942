"""Every command through typer's CliRunner: stdout holds only answers or records, stderr the
rest; exit codes 0 ok, 1 failure, 2 usage; --json parses."""

from __future__ import annotations

import csv
import io
import json
import shutil

import cli_fixtures
from pixlocal.cli.app import app
from typer.testing import CliRunner

runner = CliRunner()
tiny_registry = cli_fixtures.tiny_registry  # a fixture
make_image_folder = cli_fixtures.make_image_folder


def run(*args: str, input: str | None = None, env: dict | None = None):
    return runner.invoke(app, list(args), input=input, env={"COLUMNS": "200", **(env or {})})


def one_error_line(r, *needles: str, code: int = 1) -> str:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- ask ---------------------------------------------------------------------------------
def test_ask_answer_on_stdout_stats_on_stderr(tiny_registry, sample_png):
    r = run("ask", str(sample_png), "caption this", "-m", "tiny", "--max-tokens", "6",
            "--dtype", "float32")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() and "tok/s" not in r.stdout
    assert "tok/s" in r.stderr and "prompt tokens" in r.stderr


def test_ask_json_and_stdin_prompt(tiny_registry, sample_png):
    a = run("ask", str(sample_png), "-", "--json", "--max-tokens", "5", "--dtype", "float32",
            input="what is this?\n")
    assert a.exit_code == 0, a.stderr
    d = json.loads(a.stdout)  # the whole stdout is one JSON object
    assert len(d["tokens"]) == 5 and d["finish_reason"] == "length"
    assert set(d["timings"]) >= {"load_s", "prefill_s", "total_s", "prompt_tps", "gen_tps"}
    b = run("ask", str(sample_png), "what is this?\n", "-m", "t", "--max-tokens", "5",
            "--dtype", "float32")
    assert b.stdout.strip() == d["text"].strip()  # same prompt, from argv, same greedy answer


def test_ask_model_from_env(tiny_registry, tiny_ckpt, sample_png):
    r = run("ask", str(sample_png), "hi", "--max-tokens", "2", "--dtype", "float32",
            env={"PIXLOCAL_MODEL": str(tiny_ckpt)})
    assert r.exit_code == 0 and r.stdout.strip(), r.stderr


def test_ask_errors(tiny_registry, sample_png):
    one_error_line(run("ask", str(sample_png), "hi", "-m", "big"), "pixlocal pull big")
    one_error_line(run("ask", str(sample_png), "hi", "-m", "nope"), "nope", "models.toml")
    one_error_line(run("ask", str(sample_png), " ", "-m", "tiny"), "prompt is empty")
    r = run("ask", str(sample_png), "hi", "--max-tokens", "0")
    assert r.exit_code == 2 and r.stdout == ""


def test_placement_options_reach_the_loader(tiny_registry, sample_png, monkeypatch):
    """--device/--gpu-layers/--max-vram/--context on ask, chat, caption and bench arrive at
    pixlocal.load as its keywords; a --gpu-layers that is not a number is a usage error."""
    import pixlocal
    seen = []
    real = pixlocal.load

    def spy(path, **kw):
        seen.append(kw)
        return real(path, **{**kw, "device": "cpu"})

    monkeypatch.setattr(pixlocal, "load", spy)
    opts = ["-m", "tiny", "--dtype", "float32", "--device", "auto", "--gpu-layers", "2",
            "--max-vram", "1.5", "--context", "2048"]
    assert run("ask", str(sample_png), "hi", "--max-tokens", "2", *opts).exit_code == 0
    assert run("chat", "--max-tokens", "2", *opts, input="hi\n").exit_code == 0
    assert run("caption", str(sample_png), "--max-tokens", "2", *opts).exit_code == 0
    assert run("bench", "tiny", "-p", "8", "-n", "2", "-r", "1",
               *opts[2:]).exit_code == 0
    want = {"device": "auto", "gpu_layers": 2, "max_vram": 3 * 2**29, "context_len": 2048}
    assert len(seen) == 4 and all(kw.items() >= want.items() for kw in seen), seen
    r = run("ask", str(sample_png), "hi", "-m", "tiny", "--gpu-layers", "most")
    assert r.exit_code == 2 and "--gpu-layers" in r.stderr


def test_debug_shows_the_traceback(tiny_registry, sample_png, monkeypatch):
    monkeypatch.setenv("PIXLOCAL_DEBUG", "")  # --debug sets it; undone after the test
    r = run("--debug", "ask", str(sample_png), "hi", "-m", "nope")
    assert r.exit_code == 1 and "Traceback" in r.stderr and "ModelNotFound" in r.stderr


# ---- chat --------------------------------------------------------------------------------
def test_chat_scripted_session(tiny_registry, sample_png, tmp_path):
    saved = tmp_path / "conv.json"
    script = (f"/image {sample_png}\nwhat is it?\nand again?\n/stats\n/bogus\n"
              f"/save {saved}\n/quit\n")
    r = run("chat", "--max-tokens", "5", "--dtype", "float32", input=script)
    assert r.exit_code == 0, r.stderr
    answers = r.stdout.splitlines()
    assert len(answers) == 2 and all(a.strip() for a in answers)  # only the answers
    assert ">>>" in r.stderr and "unknown command /bogus" in r.stderr
    assert "images encoded: 1" in r.stderr
    d = json.loads(saved.read_text())
    assert d["model"] == "tiny:f32" and d["stats"]["images_encoded"] == 1
    user1, asst1, user2, asst2 = d["messages"]
    assert user1["content"][0] == {"type": "image", "image": str(sample_png)}
    assert asst1["content"] == answers[0]
    assert asst2["stats"]["images_encoded"] == 0  # the image was encoded once, in turn 1
    assert asst2["stats"]["prefilled_tokens"] < asst2["stats"]["prompt_tokens"]


def test_chat_reset_and_bad_image(tiny_registry, sample_png, tmp_path):
    saved = tmp_path / "c.json"
    script = (f"/image {tmp_path / 'missing.png'}\n/image {sample_png}\nq1\n/reset\nq2\n"
              f"/save {saved}\n")  # ends with EOF (Ctrl-D)
    r = run("chat", "--max-tokens", "3", "--dtype", "float32", input=script)
    assert r.exit_code == 0, r.stderr
    assert "missing.png: not found" in r.stderr and "conversation cleared" in r.stderr
    d = json.loads(saved.read_text())
    assert len(d["messages"]) == 2 and d["messages"][0]["content"] == [
        {"type": "text", "text": "q2"}]


def test_chat_says_when_the_context_is_full(tiny_registry, tiny_ckpt, tmp_path, sample_png):
    small = tmp_path / "small"
    small.mkdir()
    params = json.loads((tiny_ckpt / "params.json").read_text())
    params["max_seq_len"] = 40
    (small / "params.json").write_text(json.dumps(params))
    for f in ("consolidated.safetensors", "tekken.json"):
        (small / f).symlink_to(tiny_ckpt / f)
    script = f"/image {sample_png}\ndescribe\nmore\n/reset\nhi\n/quit\n"
    r = run("chat", "-m", str(small), "--max-tokens", "100", "--dtype", "float32",
            input=script)
    assert r.exit_code == 0, r.stderr
    assert "context window (40 tokens) is full" in r.stderr
    assert "no longer fits the context window of 40 tokens: /reset" in r.stderr
    assert len(r.stdout.splitlines()) == 2  # the first answer and the one after /reset


# ---- caption -----------------------------------------------------------------------------
def test_caption_jsonl_records_and_errors(tiny_registry, tmp_path):
    good, bad = make_image_folder(tmp_path / "imgs")
    r = run("caption", str(tmp_path / "imgs"), "--max-tokens", "4", "--dtype", "float32")
    assert r.exit_code == 1, r.stderr  # some images failed
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    by_path = {str(tmp_path / "imgs" / p) if not p.startswith("/") else p: x
               for x in recs for p in [x["path"]]}
    assert sorted(by_path) == sorted(str(p) for p in good + list(bad.values()))
    assert all(by_path[str(p)]["caption"] and by_path[str(p)]["tokens"] == 4 for p in good)
    for kind, p in bad.items():
        assert "error" in by_path[str(p)] and p.name in by_path[str(p)]["error"], kind
        assert f"error: {by_path[str(p)]['error']}" in r.stderr.replace("\n", " ") or \
            p.name in r.stderr
    assert "truncated" in by_path[str(bad["truncated"])]["error"]
    assert "unsupported" in by_path[str(bad["unsupported"])]["error"]
    assert "captioned 3, failed 4" in r.stderr


def test_caption_csv_resume_and_overwrite(tiny_registry, tmp_path):
    good, bad = make_image_folder(tmp_path / "imgs")
    out = tmp_path / "caps.csv"
    args = ["caption", str(tmp_path / "imgs"), "-f", "csv", "-o", str(out), "--max-tokens",
            "3", "--dtype", "float32", "--glob", "*.png"]
    r = run(*args)
    assert r.exit_code == 1 and r.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    pngs = [p for p in good + list(bad.values()) if p.suffix == ".png"]
    assert len(rows) == len(pngs)
    assert run(*args).exit_code == 2  # exists: needs --resume or --overwrite
    r = run(*args, "--resume")
    assert r.exit_code == 0 and "all already captioned" in r.stderr
    assert len(list(csv.DictReader(io.StringIO(out.read_text())))) == len(pngs)
    with open(out, "a") as f:
        f.write('"half a rec')  # a torn record, as a kill mid-write would leave
    out.unlink()
    r = run(*[a for a in args if a != "*.png"], "*.jpg", "--overwrite")
    assert len(list(csv.DictReader(io.StringIO(out.read_text())))) == 2  # good01.jpg, trunc


def test_caption_jsonl_resume_drops_a_torn_line(tiny_registry, tmp_path):
    good, bad = make_image_folder(tmp_path / "imgs", n_good=2)
    out = tmp_path / "caps.jsonl"
    first = good[0]
    r = run("caption", str(first), "-o", str(out), "--max-tokens", "2", "--dtype", "float32")
    assert r.exit_code == 0, r.stderr
    with open(out, "a") as f:
        f.write('{"path": "torn')
    r = run("caption", str(tmp_path / "imgs"), "-o", str(out), "--resume", "--max-tokens", "2",
            "--dtype", "float32")
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(x["path"] for x in recs) == sorted(
        str(p) for p in [first] + [g for g in good if g != first] + list(bad.values()))
    assert "skipped 1" in r.stderr


def test_caption_txt_sidecars(tiny_registry, tmp_path):
    good, bad = make_image_folder(tmp_path / "imgs")
    r = run("caption", str(tmp_path / "imgs"), "-f", "txt", "--max-tokens", "3",
            "--dtype", "float32", "--prompt", "Alt text?")
    assert r.exit_code == 1 and r.stdout == ""
    for p in good:
        assert p.with_suffix(".txt").read_text().strip()
    assert not any(p.with_suffix(".txt").exists() for p in bad.values())
    r = run("caption", str(tmp_path / "imgs"), "-f", "txt", "--max-tokens", "3")
    assert r.exit_code == 2 and "sidecar" in r.stderr
    r = run("caption", str(good[0]), "-f", "txt", "--resume")
    assert r.exit_code == 0 and "all already captioned" in r.stderr


def test_caption_usage_errors(tiny_registry, tmp_path):
    assert run("caption", str(tmp_path / "nope")).exit_code == 2
    assert run("caption", str(tmp_path), "-f", "xml").exit_code == 2
    assert run("caption", str(tmp_path), "--resume").exit_code == 2  # needs -o


# ---- models / info / rm ------------------------------------------------------------------
def test_models_table_and_json(tiny_registry, tiny_ckpt):
    r = run("models")
    assert r.exit_code == 0, r.stderr
    assert "tiny:f32 *" in r.stdout and "big:int4" in r.stdout and "t" in r.stdout
    assert "downloaded" in r.stdout and "pixlocal pull" in r.stderr
    d = json.loads(run("models", "--json").stdout)
    rows = {f"{m['name']}:{m['variant']}": m for m in d["models"]}
    assert rows["tiny:f32"]["downloaded"] and rows["tiny:f32"]["default"]
    assert rows["tiny:f32"]["size"] == sum(f.stat().st_size for f in tiny_ckpt.iterdir())
    assert not rows["big:int4"]["downloaded"] and rows["big:int4"]["quant"] == "int4"


def test_info(tiny_registry, tiny_args):
    d = json.loads(run("info", "t", "--json", "--context", "1000").stdout)
    a = tiny_args
    assert d["model"] == "tiny:f32" and d["quant"] is None and d["format"] == "mistral"
    assert d["decoder"]["layers"] == a.n_layers and d["vision"]["layers"] == 1
    kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * 2 * 1000  # k and v, bf16
    assert d["memory"]["kv_cache_bytes"] == kv
    assert d["memory"]["total_bytes"] == kv + 2 * (d["decoder"]["params"] +
                                                   d["vision"]["params"])
    assert d["decoder"]["params"] > 2 * a.vocab_size * a.dim
    r = run("info")
    assert r.exit_code == 0 and "memory" in r.stdout and "KV cache" in r.stdout
    one_error_line(run("info", "big"), "pixlocal pull big")


def test_rm(tiny_registry, tiny_ckpt):
    from pixlocal.config import home
    dest = home() / "big"
    shutil.copytree(tiny_ckpt, dest)
    r = run("rm", "big:bf16", input="n\n")
    assert r.exit_code == 0 and dest.exists() and "kept" in r.stderr
    r = run("rm", "big", "--all", "-y")
    assert r.exit_code == 0 and not dest.exists() and "removed big:bf16" in r.stderr
    one_error_line(run("rm", "big", "--all", "-y"), "nothing downloaded")
    one_error_line(run("rm", "/etc", "-y"), "unknown model")
