"""Soak: one `pixlocal caption` run over many generated images of mixed sizes, formats and modes
(a few broken ones mixed in), with the captioner's RSS sampled from this parent process.

    python bench/soak.py                       # 500 images, tiny model made in /tmp/h/tiny
    python bench/soak.py --images 40 --json    # what tests/test_soak.py runs

Checks, and exits 1 when one fails:
  * no record lost: exactly one record per image, every good image captioned, every broken one
    an error record naming it;
  * RSS flat: after warm-up (the first --warmup records), the RSS samples taken while the
    last fifth of the records were written are at most --max-growth MiB above those of the
    first fifth, both in median and in maximum (single samples swing with the transient
    activations of whichever image is in flight).

RSS is VmRSS from /proc/PID/status every --interval seconds, next to the count of records
written so far; the series goes to OUT/rss.csv and the summary to OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("gif", "GIF"), ("bmp", "BMP"),
           ("tif", "TIFF")]
MODES = ["RGB", "RGB", "RGB", "RGBA", "L", "P", "LA", "CMYK"]
WRITES = {"PNG": {"RGB", "RGBA", "L", "P", "LA"}, "JPEG": {"RGB", "L", "CMYK"},
          "WEBP": {"RGB", "RGBA", "L", "P", "LA"}, "GIF": {"RGB", "L", "P"},
          "BMP": {"RGB", "L", "P"}, "TIFF": set(MODES)}
BROKEN = {  # name -> bytes (None: the first image cut in half); one error record each
    "img500000-truncated.png": None, "img500001-empty.jpg": b"",
    "img500002-text.png": b"not a picture\n",
    "img500003-photo.heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
}


def make_images(folder: Path, n: int, seed: int = 0, max_side: int = 1024) -> tuple[
        list[Path], list[Path]]:
    """n images of log-uniform sizes 8..max_side px, mixed formats and modes, named in shuffled
    order (small and large ones alternate through the run); plus the BROKEN files among them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    good = []
    for i in range(n):
        w, h = (int(np.exp(rng.uniform(np.log(8), np.log(max_side)))) for _ in range(2))
        ext, fmt = FORMATS[i % len(FORMATS)]
        mode = MODES[int(rng.integers(len(MODES)))]
        if mode not in WRITES[fmt]:
            mode = "RGB"
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                         rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
        image = Image.fromarray(base).convert(mode)
        p = folder / f"img{int(rng.integers(10**6)):06d}-{i:04d}.{ext}"
        image.save(p, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        good.append(p.resolve())
    bad = []
    for name, data in BROKEN.items():
        p = folder / name
        whole = good[0].read_bytes()  # a PNG (FORMATS[0])
        p.write_bytes(data if data is not None else whole[: len(whole) // 2])
        bad.append(p.resolve())
    return good, bad


def ensure_model(path: Path) -> Path:
    if not (path / "params.json").is_file():
        subprocess.run([sys.executable, "-m", "pixlocal.synthetic", str(path), "--preset",
                        "tiny"], check=True)
    return path


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def soak(model: Path, out: Path, n_images: int, *, max_tokens: int = 16, interval: float = 1.0,
         warmup: int = 50, max_growth_mib: float = 64.0, max_side: int = 1024,
         dtype: str = "float32") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    good, bad = make_images(out / "images", n_images, max_side=max_side)
    records_path = out / "captions.jsonl"
    records_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pixlocal.cli.app", "caption", str(out / "images"),
           "-o", str(records_path), "-m", str(model), "--max-tokens", str(max_tokens),
           "--dtype", dtype]
    env = {**os.environ, "COLUMNS": "120"}
    t0 = time.monotonic()
    with open(out / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        samples = []  # (seconds, records, rss KiB)
        while proc.poll() is None:
            rss = rss_kib(proc.pid)
            if rss is not None:
                samples.append((round(time.monotonic() - t0, 2), count_lines(records_path), rss))
            time.sleep(interval)
        code = proc.wait()
    wall = time.monotonic() - t0
    with open(out / "rss.csv", "w") as f:
        f.write("seconds,records,rss_kib\n" + "".join(f"{s},{r},{k}\n" for s, r, k in samples))
    return summarize(records_path, good, bad, samples, code, wall, warmup, max_growth_mib)


def summarize(records_path: Path, good: list[Path], bad: list[Path], samples: list, code: int,
              wall: float, warmup: int, max_growth_mib: float) -> dict:
    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    paths = [str(Path(r["path"]).resolve()) for r in records]
    captioned = {p for p, r in zip(paths, records, strict=True) if "caption" in r}
    failed = {p: r["error"] for p, r in zip(paths, records, strict=True) if "error" in r}
    problems = []
    if len(paths) != len(set(paths)):
        problems.append(f"{len(paths) - len(set(paths))} duplicate records")
    lost = sorted({str(p) for p in good + bad} - set(paths))
    if lost:
        problems.append(f"{len(lost)} images without a record, e.g. {lost[0]}")
    wrong = sorted(str(p) for p in good if str(p) not in captioned)
    if wrong:
        problems.append(f"{len(wrong)} good images not captioned, e.g. {wrong[0]}: "
                        f"{failed.get(wrong[0])}")
    unnamed = [p for p in bad if Path(p).name not in failed.get(str(p), "")]
    if unnamed:
        problems.append(f"broken images without an error naming them: {unnamed}")
    # RSS swings by the transient activations of whichever image is in flight, so compare
    # windows: the samples of the first `window` records after warm-up against those of the
    # last `window` records; a leak raises both the median and the top of the window.
    window = max(10, (len(good) + len(bad) - warmup) // 5)
    first = [s[2] for s in samples if warmup <= s[1] < warmup + window]
    last = [s[2] for s in samples if s[1] >= len(records) - window]
    start = end = peak_start = peak_end = growth = peak_growth = None
    if len(first) < 2 or len(last) < 2:
        problems.append(f"too few RSS samples after warm-up ({len(first)}, {len(last)}); "
                        "lower --warmup or --interval")
    else:
        start, end = float(np.median(first)) / 1024, float(np.median(last)) / 1024
        peak_start, peak_end = max(first) / 1024, max(last) / 1024
        growth, peak_growth = end - start, peak_end - peak_start
        if growth > max_growth_mib or peak_growth > max_growth_mib:
            problems.append(f"RSS grew after warm-up: median {growth:+.1f} MiB, top "
                            f"{peak_growth:+.1f} MiB (bound {max_growth_mib} MiB)")
    if code not in (0, 1):  # 1: some images failed, which the broken ones make expected
        problems.append(f"caption exited with {code}")
    return {
        "images": len(good) + len(bad), "records": len(records), "captioned": len(captioned),
        "errors": len(failed), "exit_code": code, "wall_s": round(wall, 1),
        "samples": len(samples), "warmup_records": warmup, "window_records": window,
        "rss_max_mib": round(max(s[2] for s in samples) / 1024, 1) if samples else None,
        "rss_start_median_mib": _r(start), "rss_end_median_mib": _r(end),
        "rss_start_top_mib": _r(peak_start), "rss_end_top_mib": _r(peak_end),
        "growth_median_mib": _r(growth), "growth_top_mib": _r(peak_growth),
        "problems": problems,
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--model", type=Path, default=Path("/tmp/h/tiny"),
                    help="model dir (a tiny synthetic one is written there if absent)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/h/soak"))
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=50, help="records before RSS is judged")
    ap.add_argument("--max-growth", type=float, default=64.0, help="MiB allowed after warm-up")
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = ap.parse_args()
    summary = soak(ensure_model(a.model), a.out, a.images, max_tokens=a.max_tokens,
                   interval=a.interval, warmup=a.warmup, max_growth_mib=a.max_growth,
                   max_side=a.max_side, dtype=a.dtype)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    if a.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>26}: {v}")
    sys.exit(1 if summary["problems"] else 0)


if __name__ == "__main__":
    main()
