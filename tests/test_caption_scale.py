"""Caption at scale, one machine: --shard I/N splits the images the same way everywhere,
shards killed and resumed then merged equal one run, `caption merge` reports what is missing
or doubled and writes nothing then, and the prompt's text before the image is computed once."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import cli_fixtures
import numpy as np
import pytest
from PIL import Image
from pixlocal.cli.app import app
from pixlocal.cli.caption_core import Captioner, _prepare, collect_keyed, in_shard, shard_of
from typer.testing import CliRunner

tiny_registry = cli_fixtures.tiny_registry  # a fixture
GEN = ["--max-tokens", "16", "--dtype", "float32"]
ODD = ["plain.png", "with space.jpg", "ünïcödé/café.png", "[brackets] (1).png",
       "deep/er/still/x.png", "deep/er/y z.jpg", "日本/写真.png", "a'quote.png",
       "semi;colon.png", "UPPER.PNG"]


def make_tree(root: Path, n: int = 24) -> list[Path]:
    """n images: the odd names above, then plain ones in nested folders."""
    rng = np.random.default_rng(3)
    names = ODD + [f"n{i // 5}/img{i:02d}.png" for i in range(n - len(ODD))]
    for i, name in enumerate(names):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24 + 8 * (i % 3), 40, 3), dtype=np.uint8)
                        ).save(p, format="JPEG" if p.suffix == ".jpg" else "PNG")
    return [(root / n).resolve() for n in names]


def run(*args: str):
    return CliRunner().invoke(app, ["caption", *args])


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []


def test_shards_are_disjoint_complete_and_the_same_everywhere(tmp_path):
    make_tree(tmp_path / "a" / "pics")
    keyed = collect_keyed([tmp_path / "a" / "pics"], None, skip_txt=False)
    everything = sorted(str(p) for p, _ in keyed)
    assert len(everything) == 24
    for n in (1, 2, 3, 5, 8):
        parts = [in_shard(keyed, (i, n)) for i in range(n)]
        flat = sorted(str(p) for part in parts for p in part)
        assert flat == everything, n  # complete, and no image in two shards
        if n > 1:
            assert sum(bool(part) for part in parts) > 1, n  # a real split
    # elsewhere (another mount point, created in another order): the same split
    other = tmp_path / "mnt" / "copy"
    for p, key in reversed(keyed):
        (other / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, other / key)
    moved = collect_keyed([other], None, skip_txt=False)
    for n in (3, 5):
        for i in range(n):
            assert sorted(k for _, k in keyed if shard_of(k, n) == i) == \
                   sorted(k for p, k in moved if p in in_shard(moved, (i, n)))
    # pinned: the split must not change between versions or machines (a Slurm array whose
    # tasks ran different pixlocal versions would lose or double images)
    assert [shard_of(k, 7) for k in ("plain.png", "deep/er/still/x.png", "日本/写真.png")] \
        == [0, 4, 6]
    nfd = unicodedata.normalize("NFD", "ünïcödé/café.png")  # how macOS stores the name
    assert shard_of(nfd, 97) == shard_of("ünïcödé/café.png", 97)


@pytest.mark.parametrize("value", ["3/3", "x", "1/0", "1/2/3", "/4", "-1/2"])
def test_a_bad_shard_is_one_usage_line(tiny_registry, tmp_path, value):
    make_tree(tmp_path / "pics", n=10)
    r = run(str(tmp_path / "pics"), f"--shard={value}", *GEN)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shard" in lines[0] and "Traceback" not in r.stderr, r.stderr


def _shard_proc(pics: Path, out: Path, shard: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pixlocal.cli.app", "caption", str(pics), "-o", str(out),
           "--shard", shard, *GEN, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_shards_killed_resumed_and_merged_equal_one_run(tiny_registry, tmp_path):
    pics = tmp_path / "pics"
    images = make_tree(pics, n=16)
    one = tmp_path / "one.jsonl"
    r = run(str(pics), "-o", str(one), *GEN)
    assert r.exit_code == 0, r.stderr
    single = records(one)
    assert sorted(x["path"] for x in single) == sorted(map(str, images))

    # two shards in parallel; shard 0 is killed (SIGKILL) mid-run
    outs = [tmp_path / f"caps-{i}.jsonl" for i in range(2)]
    procs = [_shard_proc(pics, outs[i], f"{i}/2") for i in range(2)]
    deadline = time.monotonic() + 60
    while len(records(outs[0])) < 2:
        assert procs[0].poll() is None, procs[0].communicate()
        assert time.monotonic() < deadline, "shard 0 wrote no records"
        time.sleep(0.005)
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait(timeout=30)
    for p in procs[1:]:
        _, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        assert "(shard 1/2 of 16)" in stderr
    before = records(outs[0])
    share0 = len(in_shard(collect_keyed([pics], None, False), (0, 2)))
    assert 2 <= len(before) < share0, "shard 0 was not killed mid-run"

    # merging now: every image shard 0 did not finish is reported, nothing is written
    merged = tmp_path / "all.jsonl"
    r = run("merge", *map(str, outs), "-o", str(merged), "--images", str(pics))
    assert r.exit_code == 1 and not merged.exists()
    missing = [x for x in r.stderr.splitlines() if x.endswith("no record (missing)")]
    assert len(missing) == share0 - len(before), r.stderr
    assert f"{share0 - len(before)} image(s) missing" in r.stderr and "--resume" in r.stderr

    p = _shard_proc(pics, outs[0], "0/2", "--resume")
    _, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and f"skipped {len(before)}" in stderr, stderr
    assert records(outs[0])[: len(before)] == before  # what it had recorded is kept

    r = run("merge", *map(str, outs), "-o", str(merged), "--images", str(pics))
    assert r.exit_code == 0, r.stderr
    assert f"merged 16 record(s) from 2 file(s) into {merged}" in r.stderr
    got = records(merged)
    # one record per image, in a single run's order, byte-identical captions (temperature 0)
    assert [x["path"] for x in got] == [x["path"] for x in single]
    assert [x["caption"] for x in got] == [x["caption"] for x in single]
    assert [{k: v for k, v in x.items() if k != "seconds"} for x in got] == \
           [{k: v for k, v in x.items() if k != "seconds"} for x in single]

    # a shard given twice, or a whole run merged with its shards: doubled, nothing written
    r = run("merge", *map(str, outs), str(one), "-o", str(tmp_path / "x.jsonl"),
            "--images", str(pics))
    assert r.exit_code == 1 and not (tmp_path / "x.jsonl").exists()
    assert len([x for x in r.stderr.splitlines() if ": 2 records (" in x]) == 16


def _jsonl(path: Path, recs: list[dict], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def test_merge_checks_and_refuses(tmp_path):
    pics = tmp_path / "pics"
    imgs = make_tree(pics, n=12)
    recs = [{"path": str(p), "caption": f"c{i}", "tokens": 1, "seconds": 0.1}
            for i, p in enumerate(imgs)]
    recs[3] = {"path": str(imgs[3]), "error": f"{imgs[3]}: not an image"}
    a = _jsonl(tmp_path / "a.jsonl", recs[:5])
    b = _jsonl(tmp_path / "b.jsonl", recs[5:10], tail='{"path": "/torn')  # killed mid-write
    out = tmp_path / "m.jsonl"

    r = run("merge", str(a), str(b), "-o", str(out))
    assert r.exit_code == 2 and "--images" in r.stderr and "--allow-missing" in r.stderr

    r = run("merge", str(a), str(b), "-o", str(out), "--images", str(pics))
    assert r.exit_code == 1 and not out.exists()
    errors = [x for x in r.stderr.splitlines() if x.startswith("error")]
    assert sorted(errors[:2]) == [f"error: {imgs[10]}: no record (missing)",
                                  f"error: {imgs[11]}: no record (missing)"]
    assert "merge incomplete: 2 image(s) missing" in errors[2] and len(errors) == 3
    assert "torn record" in r.stderr

    r = run("merge", str(a), str(b), "-o", str(out), "--images", str(pics), "--allow-missing")
    assert r.exit_code == 0, r.stderr
    order = [str(p) for p, _ in collect_keyed([pics], None, False)]  # a single run's order
    assert records(out) == sorted(recs[:10], key=lambda x: order.index(x["path"]))
    assert "(1 of them failed images)" in r.stderr

    r = run("merge", str(a), str(b), "-o", str(out), "--images", str(pics), "--allow-missing")
    assert r.exit_code == 2 and "--overwrite" in r.stderr  # never replaced unasked

    # csv in, csv out (the caption CSV's columns); stdout without -o
    c = tmp_path / "c.csv"
    with open(c, "w", newline="") as f:  # as a caption run writes it, in its order
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "caption", "error", "tokens", "seconds"])
        w.writerows([p, f'say "hi", {i}', "", 1, 0.1] for i, p in enumerate(order))
    r = run("merge", str(c), "--images", str(pics))
    assert r.exit_code == 0, r.stderr
    assert r.stdout == c.read_text()

    # one line, no traceback, for each kind of bad input
    for args, needle in [
        ([str(a), str(c)], "merge outputs of one format"),
        ([str(a), str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file"),
        ([str(a), str(a)], "given twice"),
        ([str(_jsonl(tmp_path / "bad.jsonl", [{"caption": "no path"}]))],
         "bad.jsonl: line 1 is not a caption record"),
    ]:
        r = run("merge", *args, "--images", str(pics), "--allow-missing")
        lines = [x for x in r.stderr.splitlines() if x.startswith("error")]
        assert r.exit_code == 1 and len(lines) == 1 and needle in lines[0], r.stderr
        assert "Traceback" not in r.stderr


def test_the_text_before_the_image_is_computed_once(tiny_model, tmp_path):
    """Per image, the prefill covers the image's own tokens and the prompt after it; the
    system prompt and everything before the image come from the prompt cache."""
    imgs = make_tree(tmp_path / "pics", n=12)[:4]
    m = tiny_model
    m.reset()
    system = "You write short, factual captions for a dataset of photographs."
    cap = Captioner(m, "Describe this image.", system, {"max_tokens": 3})
    last = []
    real = m.stream_encoded

    def spy(enc, **kw):
        steps = list(real(enc, **kw))
        last.append((enc, steps[-1]))
        return iter(steps)

    m.stream_encoded = spy
    try:
        recs = [rec for _, rec in cap.records(imgs)]
    finally:
        del m.stream_encoded
    assert all("caption" in r for r in recs)
    prefix = last[0][0].tokens.index(m.encoder.img_id)  # tokens before the first [IMG]
    assert prefix > 10  # the system prompt is in it
    assert last[0][1].prefilled_tokens == last[0][1].prompt_tokens  # nothing cached yet
    for enc, step in last[1:]:
        after = len(enc.tokens) - prefix  # the image's tokens, the prompt, [/INST]
        assert step.prefilled_tokens == after
        assert step.prompt_tokens == len(enc.tokens)
    assert cap.cached == prefix * (len(imgs) - 1)
    # and the same prefix for a different prompt after the image: still reused
    enc = _prepare(m, imgs[0], "Another question entirely?", system)
    assert enc.tokens[:prefix] == last[0][0].tokens[:prefix]
