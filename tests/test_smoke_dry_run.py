"""bench/gpu_smoke.py --dry-run: every check of the GPU smoke test runs on the CPU (the cuda
backend's CPU twins stand in), prints the one JSON report and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_smoke_dry_run(tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--dry-run",
                        "--out", str(out)], capture_output=True, text=True, timeout=420)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads(r.stdout)
    assert report == json.loads(out.read_text())
    checks = report["checks"]
    assert set(checks) == {"pytest_gpu", "parity", "memory", "bench"}
    assert all(c["ok"] for c in checks.values()) and report["ok"]
    assert report["env"]["dry_run"] is True
    # the split runs some layers on each side; the whole one all on "the GPU"
    assert checks["parity"]["split"]["gpu_layers"] == [2]
    assert checks["parity"]["whole"]["gpu_layers"] == [0, 1, 2]
    mem = checks["memory"]
    assert mem["second_image_cached_prefix"]["images_encoded"] == 1
    assert mem["near_context_text"]["prompt_tokens"] > mem["prefill_chunk"]  # ran in chunks
    assert checks["bench"]["decode_bytes_per_token"] > 0
    assert 0 < checks["bench"]["fraction_of_peak"]
