"""What several commands share: the consoles, one-line errors, the options that load a model,
loading with a spinner, the stats line. Command modules import this, never cli/app.py."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

from pixlocal.config import DEFAULT_CONTEXT

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral, Step

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic",
                  ".heif", ".avif", ".jxl"}  # the last four are reported when unsupported
UNWRAPPED = 1_000_000  # columns of a console that is not a terminal: nothing is hard-wrapped


class Term(Console):
    """A rich Console that hard-wraps only on a terminal: into a pipe or a file every line
    stays whole (rich would otherwise take $COLUMNS, another stream's terminal width, or 80)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if not self.is_terminal:
            return ConsoleDimensions(UNWRAPPED, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


err = Term(stderr=True, highlight=False)  # status, progress, errors: the answers' stdout stays clean


def out(markup: bool = True) -> Term:
    """A console on stdout as it is now (CliRunner swaps sys.stdout per call)."""
    return Term(highlight=False, soft_wrap=True, markup=markup)


def error_line(msg: object) -> None:
    """One red `error: ...` line; the message is printed as it is (no markup in it is read)."""
    err.print(f"[red]error:[/red] {escape(' '.join(str(msg).split()))}", soft_wrap=True)


def _os_error_text(e: OSError) -> str:
    what = e.strerror or str(e)
    return f"{e.filename}: {what}" if e.filename else what


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """PixlocalError or an OSError (a file that cannot be written, a full disk) -> one red line
    and exit 1; Ctrl-C -> exit 130. --debug (or $PIXLOCAL_DEBUG) shows the traceback first.
    A closed stdout (`| head`) is left to the caller: the app exits quietly."""
    from pixlocal.errors import PixlocalError
    try:
        yield
    except BrokenPipeError:
        raise
    except (PixlocalError, OSError) as e:
        if isinstance(e, OSError) and e.errno is None:
            raise  # an OSError without an errno is not about the user's files: a bug
        if os.environ.get("PIXLOCAL_DEBUG"):
            err.print_exception()
        error_line(_os_error_text(e) if isinstance(e, OSError) else e)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def is_broken_pipe(e: BaseException) -> bool:
    return isinstance(e, BrokenPipeError) or (isinstance(e, OSError) and
                                              e.errno == errno.EPIPE)


ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", "-t", min=1,
    help="CPU threads (default: the cores free to this process; $PIXLOCAL_THREADS).")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Model directory, or a name/alias from models.toml (NAME[:VARIANT]); "
    "default: $PIXLOCAL_MODEL, then the registry default.")]
DtypeOpt = Annotated[str, typer.Option(
    help="auto (bfloat16 on a GPU or a CPU with native bfloat16, else float32), bfloat16 or "
         "float32.")]
def check_device(value: str) -> str:
    """--device: auto, cpu, cuda or cuda:N (torch's own error for anything else is a
    traceback-sized RuntimeError)."""
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
        raise typer.BadParameter(f"{value!r} is not auto, cpu, cuda or cuda:N")
    return value


DeviceOpt = Annotated[str, typer.Option(
    callback=check_device, help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N.")]
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
               context: int = DEFAULT_CONTEXT, threads: int | None = None
               ) -> tuple[Pixtral, float, str]:
    """Resolve --model and load it under a spinner: (model, load seconds, label)."""
    import pixlocal

    from .registry import resolve

    kw = placement_kw(gpu_layers, max_vram, context)
    with err.status("preparing the model …"):
        r = resolve(ref)  # the demo model is made here on first use
    if r.spec is not None and r.spec.note:
        err.print(f"note: {escape(r.spec.note)}", style="yellow")
    t0 = time.perf_counter()
    if threads is not None:
        kw["threads"] = threads
    with err.status(f"loading {escape(r.label)} …"):
        m = pixlocal.load(r.path, device=device, dtype=dtype, max_image_size=max_image_size,
                          **kw)
    load_s = time.perf_counter() - t0
    compile_kernels(m)  # before any prompt: its time stays out of the token rates
    return m, load_s, r.label


def compile_kernels(m: Pixtral) -> float | None:
    """On the first run (pixlocal/warm.py): say that the CPU kernels are being compiled, with
    progress, and compile them; the seconds it took, None when nothing needed compiling."""
    import threading

    from pixlocal.kernels import jit

    from .warm import needs_warmup, warmup

    if not needs_warmup(m):
        jit.preload()  # cached kernels loaded now, not inside the first token
        return None
    names, t0, done = jit.uncompiled(), time.perf_counter(), threading.Event()
    msg = "compiling CPU kernels (first run only, usually 15-60 s)"
    with err.status(msg + " …") as st:
        def tick() -> None:
            while not done.wait(0.5):
                k = round(jit.compiled_fraction(names) * len(names))
                st.update(f"{msg}: {k}/{len(names)} kernels · {time.perf_counter() - t0:.0f} s")
        th = threading.Thread(target=tick, daemon=True)
        th.start()
        try:
            warmup(m)
        finally:
            done.set()
            th.join()
    s = time.perf_counter() - t0
    err.print(f"[dim]compiled CPU kernels in {s:.0f} s (cached for later runs)[/dim]")
    return s


def context_room(m: Pixtral, n_prompt: int) -> int:
    """Tokens left after an n_prompt-token prompt in the context the loaded model holds: a
    --max-tokens beyond it stops at the context's end (finish reason "length")."""
    limit = min(m.args.max_seq_len, getattr(m, "context_len", m.args.max_seq_len))
    return limit - n_prompt


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
