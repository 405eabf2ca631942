"""A short soak (bench/soak.py with 40 images): one `pixlocal caption` process over images of
mixed sizes, formats and modes with broken ones among them; one record per image, every
broken one an error naming it, RSS flat after warm-up. The 500-image run is bench/soak.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


@pytest.fixture(scope="module")
def soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_caption_40_images_loses_nothing_and_rss_stays_flat(soak, tiny_ckpt, tmp_path):
    s = soak.soak(tiny_ckpt, tmp_path / "soak", 40, max_tokens=8, interval=0.05, warmup=10,
                  max_growth_mib=48.0, max_side=256)
    assert s["problems"] == [], s
    assert (s["images"], s["records"], s["captioned"], s["errors"]) == (44, 44, 40, 4)
    assert s["exit_code"] == 1  # the broken images failed, which the exit code reports


def test_the_soak_check_catches_lost_records_and_growth(soak, tmp_path):
    """The judge itself: a missing record, a missing error, and RSS growth are all reported."""
    good, bad = soak.make_images(tmp_path / "imgs", 30, max_side=16)
    out = tmp_path / "c.jsonl"
    lines = [f'{{"path": "{p}", "caption": "x"}}' for p in good[1:]]
    lines += [f'{{"path": "{p}", "error": "broken"}}' for p in bad]
    out.write_text("\n".join(lines) + "\n")
    flat = [(i, r, 500_000) for i, r in enumerate(range(0, len(lines) + 1))]
    s = soak.summarize(out, good, bad, flat * 3, 1, 1.0, 0, 10.0)
    text = " ".join(s["problems"])
    assert "1 images without a record" in text and "broken images without an error" in text
    assert "RSS" not in text
    growing = [(i, r, 500_000 + 100_000 * r) for i, r in enumerate(range(0, len(lines) + 1))]
    s = soak.summarize(out, good, bad, growing * 3, 1, 1.0, 0, 10.0)
    assert any("RSS grew" in p for p in s["problems"])
