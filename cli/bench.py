"""`pixlocal bench MODEL`: llama-bench-style load / prefill / decode figures."""

from __future__ import annotations

import itertools
import json
import resource
import statistics
import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import (
    DEFAULT_CONTEXT,
    ContextOpt,
    DeviceOpt,
    GpuLayersOpt,
    MaxVramOpt,
    ThreadsOpt,
    err,
    out,
    placement_kw,
    user_errors,
)

if TYPE_CHECKING:
    import torch


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def decode_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every decoder layer, the final norm and the
    output head (the vision tower and the embedding table are not touched; one embedding row
    is negligible). A quantized layer counts what its backend's kernel reads of its prepared
    weight (Backend.weight_bytes: the cuda backend's tinygemm packing, the cpu backend's
    interleaved blocks; not the stored buffers, which a GPU load empties); a weight stacked
    with others (qkv, w1/w3) is read once with its stack; any other tensor held in two
    places counts once."""
    from pixlocal.qlinear import QLinear

    skip = ("vision_encoder.", "vision_language_adapter.", "tok_embeddings.")
    seen: set[int] = set()
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QLinear) and not name.startswith(skip):
            total += mod.nbytes
            seen |= {id(t) for t in (mod.qweight, mod.scales, mod.zeros)}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith(skip) or t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def run_bench(model_dir: str, *, n_prompt: int, n_gen: int, image: str | None, reps: int,
              device: str, dtype: str, max_image_size: int | None,
              **placement: Any) -> dict[str, Any]:
    """`placement`: gpu_layers, max_vram, context_len as pixlocal.load takes them."""
    import torch

    import pixlocal
    from pixlocal.generate import generate_step, make_sampler
    from pixlocal.kernels import backend
    from pixlocal.prompt import Encoded

    t0 = time.perf_counter()
    m = pixlocal.load(model_dir, device=device, dtype=dtype, max_image_size=max_image_size,
                      **placement)
    load_s = time.perf_counter() - t0

    devices = {m.device, m.vision_device, *m.layer_devices}

    def clock() -> float:  # GPU kernels run asynchronously: wait for them first
        backend.synchronize(devices)
        return time.perf_counter()

    t0 = clock()  # first forward: numba JIT (or its cache), torch's lazy init
    m.prefill(Encoded([1] + [1000 + i for i in range(7)], []))
    m.decode(1001)
    warmup_s = clock() - t0

    if image:
        enc = m.encode([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": "Describe this."}]}])
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, m.args.vocab_size, (n_prompt - 1,), generator=g).tolist()
        enc = Encoded([1] + ids, [])
    prefill_s, decode_s, prefill_threads = [], [], []
    for _ in range(reps):
        m.reset()
        prefill_threads.append(m.threads.current())
        t0 = clock()
        logits = m.prefill(enc)
        prefill_s.append(clock() - t0)
        # n_gen decode steps: the first token comes from the prefill's logits, each later
        # one from a step (generate_step runs a token only when the next is asked for)
        t0 = clock()
        for _ in itertools.islice(generate_step(m, logits, make_sampler()), n_gen + 1):
            pass
        decode_s.append(clock() - t0)
    m.reset()
    per_tok = decode_bytes_per_token(m.model)
    prefill_tps = len(enc.tokens) / _median(prefill_s)
    decode_tps = n_gen / _median(decode_s) if n_gen else 0.0
    return {
        "model": str(model_dir), "device": m.plan.label, "dtype": str(m.dtype).split(".")[-1],
        "threads": torch.get_num_threads(), "prefill_threads": prefill_threads,
        "thread_switches": m.threads.switches, "n_prompt": len(enc.tokens), "n_gen": n_gen,
        "images": len(enc.images), "reps": reps,
        "load_s": round(load_s, 3), "warmup_s": round(warmup_s, 3),
        "prefill_s": round(_median(prefill_s), 4), "prefill_tps": round(prefill_tps, 2),
        "decode_tps": round(decode_tps, 3),
        "decode_bytes_per_token": per_tok,
        "effective_gbps": round(per_tok * decode_tps / 1e9, 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def bench(
    model: Annotated[str | None, typer.Argument(
        help="Model directory or registry NAME[:VARIANT] (default: $PIXLOCAL_MODEL, then the "
        "registry default).")] = None,
    n_prompt: Annotated[int, typer.Option("-p", "--n-prompt", min=2,
                                          help="Prompt tokens to prefill.")] = 512,
    n_gen: Annotated[int, typer.Option("-n", "--n-gen", min=0,
                                       help="Tokens to decode.")] = 128,
    image: Annotated[str | None, typer.Option(
        help="Prefill a chat with this image instead of -p random tokens.")] = None,
    threads: ThreadsOpt = None,
    reps: Annotated[int, typer.Option("-r", "--reps", min=1, help="Repetitions.")] = 3,
    max_image_size: Annotated[int | None, typer.Option(help="Longest image side.")] = None,
    device: DeviceOpt = "auto",
    gpu_layers: GpuLayersOpt = "auto",
    max_vram: MaxVramOpt = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    dtype: Annotated[str, typer.Option(help="Activation dtype (as for ask).")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure load time, JIT warm-up, prefill and decode speed, bandwidth and peak RSS."""
    with user_errors():
        from .registry import resolve
        kw = placement_kw(gpu_layers, max_vram, context)
        if threads is not None:
            kw["threads"] = threads
        model_dir = resolve(model).path
        with err.status("benchmarking …"):
            r = run_bench(str(model_dir), n_prompt=n_prompt, n_gen=n_gen, image=image,
                          reps=reps, device=device, dtype=dtype, max_image_size=max_image_size,
                          **kw)
        if as_json:
            sys.stdout.write(json.dumps(r) + "\n")
            return
        from rich.table import Table
        t = Table(box=None)
        for col in ("test", "tokens", "tok/s", "notes"):
            t.add_column(col)
        t.add_row(f"pp{r['n_prompt']}", str(r["n_prompt"]), f"{r['prefill_tps']:.1f}",
                  f"{r['images']} image(s)" if r["images"] else "")
        t.add_row(f"tg{n_gen}", str(n_gen), f"{r['decode_tps']:.2f}",
                  f"{r['effective_gbps']:.1f} GB/s of weights")
        out().print(t)
        err.print(f"[dim]load {r['load_s']:.2f} s · warm-up {r['warmup_s']:.2f} s · "
                  f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB · {r['threads']} threads · "
                  f"{r['device']} {r['dtype']}[/dim]")
