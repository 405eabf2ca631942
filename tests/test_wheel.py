"""A wheel built from this tree (`pip wheel`, offline) and installed on its own lists the
registry: models.toml ships as package data, not only beside the source checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "models.toml", "pixlocal",
           "quant", "cli")


def test_wheel_install_lists_the_registry(tmp_path):
    src = tmp_path / "src"  # built from a copy: the build's own build/ stays out of the tree
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist")], check=True, capture_output=True, timeout=120)
    wheel = next((tmp_path / "dist").glob("pixlocal-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k != "PIXLOCAL_MODELS_TOML"}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install's finder
    run = tmp_path / "elsewhere"
    run.mkdir()
    r = subprocess.run([sys.executable, str(site / "bin" / "pixlocal"), "models", "--json"],
                       cwd=run, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert Path(d["registry"]) == site / "pixlocal" / "models.toml"
    want = tomllib.loads((ROOT / "models.toml").read_text())
    assert {m["name"] for m in d["models"]} == set(want["models"]) != set()
    assert d["default"] == want["default"]
