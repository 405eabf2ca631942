"""`pixlocal doctor`: versions, CPU and GPU facts, the kernel each layer kind uses, the plan."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pixlocal.config import DEFAULT_CONTEXT

from .common import check_device, err, user_errors
from .common import out as out_console
from .units import human_bytes

if TYPE_CHECKING:
    from pixlocal.placement import Plan

_CPU_KERNELS = {"cpu": "numba GEMV / dequant tile + GEMM"}  # what each backend runs, by name
_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI",
          "avx_vnni": "AVX-VNNI", "avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16",
          "amx_int8": "AMX-INT8"}


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_facts(cpuinfo: str | None = None) -> dict[str, Any]:
    """Model, ISA features and physical cores (pixlocal.host; `cpuinfo`: /proc/cpuinfo's text
    to read instead of this machine's)."""
    from pixlocal import host
    c = host.cpu() if cpuinfo is None else host.parse_cpuinfo(cpuinfo)
    return {"model": c.model, "features": [n for f, n in _FLAGS.items() if f in c.flags],
            "physical_cores": c.physical_cores, "logical_cpus": c.logical_cpus}


def ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def kernel_table(cap: tuple[int, int] | None, cuda: bool, tinygemm: bool = True,
                 fused: bool = False) -> list[tuple[str, str, str]]:
    """(layer kind, CPU kernel, CUDA kernel) for decode (1 token) / prefill (1024 tokens),
    12B shapes; cap is the CUDA device's compute capability, `tinygemm` and `fused` whether
    tinygemm and the Triton kernel run there (the cuda backend's own choice, kernel_for)."""
    import torch

    from pixlocal import kernels
    from pixlocal.kernels import cuda as ck

    name = kernels.default_backend("cpu")
    cpu_q = f"{name}: {_CPU_KERNELS.get(name, 'torch dequantize + matmul')}"

    def gpu(bits: int, shape: tuple[int, int]) -> str:
        if not cuda:
            return "no CUDA device"
        return " / ".join(ck.kernel_for(bits, shape, n, cap, tinygemm=tinygemm, fused=fused)
                          for n in (1, 1024))

    half = str(ck.compute_dtype(torch.bfloat16, cap)).removeprefix("torch.")
    return [("decoder linear int4", cpu_q, gpu(4, (14336, 5120))),
            ("decoder linear int8", cpu_q, gpu(8, (14336, 5120))),
            ("output head (int8)", cpu_q, gpu(8, (131072, 5120))),
            ("attention", f"{name}: decode kernel / torch SDPA",
             f"torch SDPA {half} (flash / memory-efficient)" if cuda else "no CUDA device"),
            ("vision encoder + adapter", "torch, load dtype",
             f"torch {half} (cuBLAS)" if cuda else "no CUDA device")]


def gpu_dtypes(cap: tuple[int, int]) -> str:
    """What a bfloat16 (auto) load computes in on a GPU of capability `cap`, in words."""
    import torch

    from pixlocal.kernels import cuda as ck
    if ck.compute_dtype(torch.bfloat16, cap) == torch.bfloat16:
        return "bfloat16 throughout"
    return (f"bfloat16 residual stream and KV cache; float16 GEMMs, attention and vision "
            f"encoder (compute capability {cap[0]}.{cap[1]} < 8.0 has no native bfloat16)")


def gather(device: str, gpu_layers: str, max_vram: float | None, model: str | None,
           context: int) -> dict[str, Any]:
    import torch

    from pixlocal import memory, placement
    from pixlocal.config import PixtralArgs
    from pixlocal.loader import parse_device
    from pixlocal.qformat import QuantSpec

    dev = parse_device(device)
    info: dict[str, Any] = {
        "versions": {"pixlocal": _version("pixlocal"), "torch": torch.__version__,
                     "cuda (torch build)": torch.version.cuda or "none",
                     "numba": _version("numba"), "mistral-common": _version("mistral_common"),
                     "numpy": _version("numpy"), "python": platform.python_version()},
        "cpu": cpu_facts(), "ram_bytes": ram_bytes(), "device": str(dev), "gpu": None,
    }
    cap = None
    tinygemm, fused = True, False
    if dev.type == "cuda":
        from pixlocal.kernels import cuda as ck
        free, total = torch.cuda.mem_get_info(dev)
        cap = torch.cuda.get_device_capability(dev)
        missing = ck.tinygemm_missing(dev)
        tinygemm, fused = missing is None, ck.fused_available(dev)
        info["gpu"] = {"name": torch.cuda.get_device_name(dev),
                       "compute_capability": f"{cap[0]}.{cap[1]}", "free_vram_bytes": free,
                       "total_vram_bytes": total, "dtypes": gpu_dtypes(cap),
                       "tinygemm": missing or "available",
                       "triton": "available" if fused else "not installed: int8 and "
                       "untiled int4 dequantize per call (slow decode)"}
    info["kernels"] = kernel_table(cap, dev.type == "cuda", tinygemm, fused)
    layers: int | str = "auto" if gpu_layers == "auto" else int(gpu_layers)
    if model is not None:
        from pixlocal.checkpoint import open_checkpoint
        from pixlocal.config import read_args
        from pixlocal.loader import resolve_dir
        args = read_args(resolve_dir(model))
        sizes = memory.checkpoint_bytes(open_checkpoint(resolve_dir(model), args),
                                        torch.bfloat16)
        what = str(model)
    else:
        args = PixtralArgs.pixtral_12b()
        sizes = memory.estimate_bytes(args, QuantSpec.default(4))
        what = "Pixtral-12B int4-g32 (estimate)"
    free_b = info["gpu"]["free_vram_bytes"] if info["gpu"] else None
    plan = placement.plan(args, sizes, free_b, min(context, args.max_seq_len),
                          memory.image_tokens(args), layers,  # type: ignore[arg-type]
                          None if max_vram is None else int(max_vram * placement.GiB),
                          int4_pairs=tinygemm)
    info["plan"] = {"model": what, "gpu_layers": plan.gpu_layers, "text": describe_plan(plan)}
    return info


def describe_plan(plan: Plan) -> str:
    """A plan in a few lines (what goes where, and the bytes), for `doctor` to print."""
    from pixlocal.placement import GPU, GiB

    n, g = plan.n_layers, plan.gpu_layers

    def fmt(b: int) -> str:
        return f"{b / GiB:.2f} GiB"
    layer = max((b for p, b in plan.weights.items() if p.startswith("layers.")), default=0)
    lines = [f"context {plan.context_len} tokens, largest image {plan.image_patches} "
             f"patches; KV cache {fmt(plan.kv_per_layer * n)} "
             f"({fmt(plan.kv_per_layer)}/layer), one decoder layer {fmt(layer)}"]
    if plan.free_vram is None:
        lines.append(f"no CUDA device: everything on the CPU ({fmt(plan.cpu_bytes)} of "
                     "weights + KV cache)")
        return "\n".join(lines)
    span = "none" if not g else f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0])
    others = ", ".join(p for p in ("vision", "output", "embeddings")
                       if plan.on_gpu(p)) or "nothing else"
    w, kv = plan.bytes_on(GPU)
    lines += [f"GPU: {len(g)}/{n} decoder layers ({span}) + {others}; weights {fmt(w)} + "
              f"KV {fmt(kv)} + activations {fmt(plan.activations)} = "
              f"{fmt(plan.gpu_bytes)} of {fmt(plan.budget)} usable "
              f"({fmt(plan.free_vram)} free, margin {fmt(plan.margin)})",
              f"CPU: {n - len(g)} decoder layers + "
              + (", ".join(p for p, d in plan.devices.items()
                           if not plan.on_gpu(p) and not p.startswith("layers.")) or "nothing")
              + f"; {fmt(plan.cpu_bytes)} of weights + KV cache"]
    return "\n".join(lines)


def _size(b: int | None) -> str:
    return "unknown" if b is None else human_bytes(b)


def doctor(
    device: Annotated[str, typer.Option(callback=check_device,
                                        help="auto, cpu, cuda or cuda:N.")] = "auto",
    gpu_layers: Annotated[str, typer.Option(help="Decoder layers on the GPU: N or auto.")
                          ] = "auto",
    max_vram: Annotated[float | None, typer.Option(help="Cap on the VRAM to plan for, GiB.")
                        ] = None,
    model: Annotated[str | None, typer.Option(help="Plan for this model dir (default: "
                                                   "12B int4 shapes).")] = None,
    context: Annotated[int, typer.Option(help="Context length to plan the KV cache for.")
                       ] = DEFAULT_CONTEXT,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Check this machine: versions, CPU features, GPU, kernels, and the memory plan."""
    if gpu_layers != "auto" and not gpu_layers.isdigit():
        raise typer.BadParameter(f"{gpu_layers!r} is not a number or auto",
                                 param_hint="--gpu-layers")
    with user_errors():
        info = gather(device, gpu_layers, max_vram, model, context)
    if as_json:
        import json
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.table import Table
    out = out_console(markup=False)  # versions, CPU names, the plan: printed as they are
    for k, v in info["versions"].items():
        out.print(f"{k:>20}  {v}")
    c = info["cpu"]
    out.print(f"{'cpu':>20}  {c['model']} · {c['physical_cores']} physical cores, "
              f"{c['logical_cpus']} logical · {', '.join(c['features']) or 'no AVX2'}")
    out.print(f"{'ram':>20}  {_size(info['ram_bytes'])}")
    g = info["gpu"]
    out.print(f"{'gpu':>20}  " + ("no CUDA device" if g is None else
              f"{g['name']} · compute capability {g['compute_capability']} · "
              f"{_size(g['free_vram_bytes'])} free of {_size(g['total_vram_bytes'])}"))
    if g is not None:
        for k in ("dtypes", "tinygemm", "triton"):
            out.print(f"{k:>20}  {g[k]}")
    t = Table("layer kind", "CPU (decode / prefill)", "CUDA (decode / prefill)")
    for row in info["kernels"]:
        t.add_row(*row)
    out.print(t)
    out.print(f"memory plan for {info['plan']['model']}:\n{info['plan']['text']}")
    err.print("[dim]doctor: done[/dim]")
