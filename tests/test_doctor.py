"""`pixlocal doctor` through typer's CliRunner (no GPU here: the CUDA parts are faked)."""

from __future__ import annotations

import json

import pytest
import torch
from pixlocal.cli import doctor as doc
from pixlocal.cli.app import app
from typer.testing import CliRunner

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16
processor\t: 1
model name\t: Test CPU 9000
physical id\t: 0
core id\t: 0
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16
processor\t: 2
model name\t: Test CPU 9000
physical id\t: 0
core id\t: 1
flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16
"""


@pytest.fixture
def runner():
    return CliRunner()


def test_cpu_facts_from_cpuinfo():
    c = doc.cpu_facts(CPUINFO)
    assert c["model"] == "Test CPU 9000" and c["physical_cores"] == 2
    assert c["features"] == ["AVX2", "AVX-512", "AVX512-VNNI", "AVX512-BF16"]


def test_doctor_without_cuda(runner):
    r = runner.invoke(app, ["doctor", "--device", "auto"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    for want in (f"torch  {torch.__version__}", "numba", "mistral-common", "numpy",
                 "physical cores", "no CUDA device", "decoder linear int4", "output head",
                 "vision encoder", "memory plan for Pixtral-12B int4-g32",
                 "everything on the CPU"):
        assert want in out, want
    assert "doctor: done" in r.stderr and "doctor: done" not in out


def test_doctor_cuda_without_cuda_is_one_line_and_exit_1(runner, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = runner.invoke(app, ["doctor", "--device", "cuda"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "no CUDA device" in r.stderr


def test_doctor_rejects_a_bad_gpu_layers(runner):
    r = runner.invoke(app, ["doctor", "--gpu-layers", "lots"])
    assert r.exit_code == 2 and "auto" in r.stderr


def _fake_gpu(monkeypatch, cap, name, fused=False):
    from pixlocal.kernels import cuda
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (int(7.4 * gib), 8 * gib))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.setattr(cuda, "capability", lambda d: cap)
    monkeypatch.setattr(cuda, "_MISSING", {"cuda": None})  # the probe would need a device
    monkeypatch.setattr(cuda, "fused_available", lambda d: fused)


def test_doctor_on_a_turing_card_tells_the_dtypes_it_computes_in(runner, monkeypatch):
    """Below compute capability 8.0: bfloat16 stays the residual stream's and KV cache's
    dtype, GEMMs, attention and the vision tower compute in float16 (the loader and the
    cuda backend do, tests/test_placement.py and test_cuda_logic.py), no tinygemm: int4 and
    int8 take the fused Triton kernel (or dequantize per call without Triton, and say so)."""
    _fake_gpu(monkeypatch, (7, 5), "Fake T4", fused=True)
    r = runner.invoke(app, ["doctor", "--device", "cuda", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert "float16 GEMMs, attention and vision encoder" in info["gpu"]["dtypes"]
    assert "7.5 < 8.0" in info["gpu"]["tinygemm"]
    kinds = {k: gpu for k, _, gpu in info["kernels"]}
    assert kinds["decoder linear int4"] == "fused-dequant-float16 / dequant-gemm-float16"
    assert kinds["output head (int8)"] == "fused-dequant-float16 / dequant-gemm-float16"
    assert kinds["attention"].startswith("torch SDPA float16")
    assert kinds["vision encoder + adapter"] == "torch float16 (cuBLAS)"
    _fake_gpu(monkeypatch, (7, 5), "Fake T4", fused=False)
    r = runner.invoke(app, ["doctor", "--device", "cuda"])
    assert "not installed" in r.stdout and "dequant-gemm-float16 / dequant" in r.stdout


def test_doctor_with_a_fake_8gb_gpu_plans_a_partial_offload(runner, monkeypatch):
    _fake_gpu(monkeypatch, (8, 6), "Fake RTX 3070")
    r = runner.invoke(app, ["doctor", "--device", "cuda", "--context", "8192", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["gpu"]["name"] == "Fake RTX 3070" and info["gpu"]["compute_capability"] == "8.6"
    assert info["gpu"]["dtypes"] == "bfloat16 throughout"
    assert info["gpu"]["tinygemm"] == "available"
    kinds = {k: gpu for k, _, gpu in info["kernels"]}
    assert kinds["decoder linear int4"] == "tinygemm-int4 / dequant-gemm-bfloat16"
    assert kinds["decoder linear int8"] == "dequant-gemm-bfloat16 / dequant-gemm-bfloat16"
    assert kinds["attention"].startswith("torch SDPA bfloat16")
    assert 15 <= len(info["plan"]["gpu_layers"]) < 40
    capped = runner.invoke(app, ["doctor", "--device", "cuda", "--max-vram", "2", "--json"])
    assert len(json.loads(capped.stdout)["plan"]["gpu_layers"]) < len(info["plan"]["gpu_layers"])
    too_many = runner.invoke(app, ["doctor", "--device", "cuda", "--gpu-layers", "40"])
    assert too_many.exit_code == 1 and "--gpu-layers 40 needs" in too_many.stderr


def test_doctor_plans_a_model_dir(runner, tiny_ckpt):
    r = runner.invoke(app, ["doctor", "--model", str(tiny_ckpt), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["model"] == str(tiny_ckpt)
