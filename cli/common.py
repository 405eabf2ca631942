"""What several commands share: the --model option, loading with a spinner, the stats line."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pixlocal.config import DEFAULT_CONTEXT

from .app import err

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral, Step

ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model directory, or a name/alias from models.toml (NAME[:VARIANT]); "
    "default: $PIXLOCAL_MODEL, then the registry default.")]
DtypeOpt = Annotated[str, typer.Option(
    help="auto (bfloat16 on a GPU or a CPU with native bfloat16, else float32), bfloat16 or "
         "float32.")]
DeviceOpt = Annotated[str, typer.Option(
    help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")]
GpuLayersOpt = Annotated[str, typer.Option(
    help="Decoder layers on the GPU: N, or auto (as many as fit; the rest run on the CPU).")]
MaxVramOpt = Annotated[float | None, typer.Option(
    min=0.0, help="Use at most this much VRAM, GiB (default: what is free).")]
ContextOpt = Annotated[int, typer.Option(
    min=1, help="Context length the GPU's KV cache is planned for (tokens).")]
MaxImageOpt = Annotated[int | None, typer.Option(
    help="Lower the longest image side (e.g. 512) to cut prefill time.")]


def placement_kw(gpu_layers: str, max_vram: float | None, context: int) -> dict[str, Any]:
    """--gpu-layers/--max-vram/--context as pixlocal.load's keywords."""
    if gpu_layers != "auto" and not gpu_layers.isdigit():
        raise typer.BadParameter(f"{gpu_layers!r} is not a number or auto",
                                 param_hint="--gpu-layers")
    return {"gpu_layers": "auto" if gpu_layers == "auto" else int(gpu_layers),
            "max_vram": None if max_vram is None else int(max_vram * 2**30),
            "context_len": context}


def load_model(ref: str | None, *, device: str, dtype: str, max_image_size: int | None = None,
               gpu_layers: str = "auto", max_vram: float | None = None,
               context: int = DEFAULT_CONTEXT) -> tuple[Pixtral, float, str]:
    """Resolve --model and load it under a spinner: (model, load seconds, label)."""
    import pixlocal
    from pixlocal.registry import resolve

    kw = placement_kw(gpu_layers, max_vram, context)
    r = resolve(ref)
    t0 = time.perf_counter()
    with err.status(f"loading {r.label} …"):
        m = pixlocal.load(r.path, device=device, dtype=dtype, max_image_size=max_image_size,
                          **kw)
    return m, time.perf_counter() - t0, r.label


def stats_line(last: Step | None, n_tokens: int, load_s: float | None = None) -> str:
    if last is None:
        return "no tokens generated"
    cached = last.prompt_tokens - last.prefilled_tokens
    s = (f"{last.prompt_tokens} prompt tokens" + (f" ({cached} cached)" if cached else "")
         + f" in {last.prefill_s:.2f} s ({last.prompt_tps:.1f} tok/s) · {n_tokens} tokens at "
         f"{last.gen_tps:.1f} tok/s")
    return s + (f" · load {load_s:.1f} s" if load_s is not None else "")


def timings(last: Step | None, load_s: float | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {} if load_s is None else {"load_s": round(load_s, 3)}
    d.update({"prefill_s": round(last.prefill_s, 3) if last else 0.0,
              "total_s": round(last.elapsed_s, 3) if last else 0.0,
              "prompt_tps": round(last.prompt_tps, 2) if last else 0.0,
              "gen_tps": round(last.gen_tps, 2) if last else 0.0})
    return d
