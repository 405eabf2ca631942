"""`pixlocal models | pull NAME | info MODEL | rm MODEL`: the registry and the model home."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .common import err, escape, user_errors
from .common import out as out_console
from .units import human_bytes as human

if TYPE_CHECKING:
    from pixlocal.config import PixtralArgs

    from .hub import PullEvent


def _out() -> Console:
    return out_console()  # stdout as it is now; unwrapped when it is not a terminal


def load_estimate(model_dir: Path, args: PixtralArgs, quantized: bool, params: int,
                  context: int) -> dict[str, int]:
    """`pixlocal info`'s memory line: weights (a quantized dir's shard files as they are;
    unquantized weights load as bfloat16, 2 bytes each) + the KV cache for `context` tokens."""
    weights = (sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
               if quantized else 2 * params)
    from pixlocal.memory import kv_bytes_per_token

    kv = kv_bytes_per_token(args) * context
    return {"context": context, "weights_bytes": weights, "kv_cache_bytes": kv,
            "kv_bytes_per_token": kv_bytes_per_token(args), "total_bytes": weights + kv}


# ---- models ------------------------------------------------------------------------------
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """List the registry's models, their variants, and which are downloaded."""
    with user_errors():
        from .registry import dir_size, home, is_downloaded, load_registry
        reg = load_registry()
        rows = []
        for spec in reg.models.values():
            for v in spec.variants.values():
                here = is_downloaded(v.path)
                rows.append({"name": spec.name, "aliases": list(spec.aliases),
                             "variant": v.name, "quant": v.quant,
                             "default": spec.name == reg.default and
                             v.name == spec.default_variant,
                             "downloaded": here, "size": dir_size(v.path) if here else None,
                             "path": str(v.path)})
        if as_json:
            sys.stdout.write(json.dumps({"registry": str(reg.path), "home": str(home()),
                                         "default": reg.default, "models": rows}) + "\n")
            return
        t = Table(box=None, pad_edge=False)
        for col in ("NAME", "ALIASES", "VARIANT", "STATUS", "SIZE", "PATH"):
            t.add_column(col, no_wrap=col != "PATH" or not sys.stdout.isatty(),
                         overflow="fold")
        for r in rows:
            t.add_row(escape(f"{r['name']}:{r['variant']}" + (" *" if r["default"] else "")),
                      escape(", ".join(r["aliases"])), escape(r["quant"] or "original"),
                      "[green]downloaded[/green]" if r["downloaded"] else "[dim]-[/dim]",
                      human(r["size"]) if r["size"] is not None else "",
                      escape(r["path"]))
        _out().print(t)
        err.print(f"* default · registry {reg.path} · home {home()} · "
                  "get one with `pixlocal pull NAME`", style="dim", markup=False, soft_wrap=True)


# ---- pull --------------------------------------------------------------------------------
class _PullView:
    """Draws pixlocal.hub's PullEvents on stderr: one line and one rich bar per file
    (huggingface_hub's own bars hide themselves when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: Any = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __call__(self, ev: PullEvent) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        if ev.what == "bytes" and self.bar is not None:
            self.bar.update(self.task, completed=ev.done, total=ev.total)
            return
        self.close()
        if ev.what == "file":
            err.print(f"{ev.repo}: {ev.name} ({ev.index}/{ev.count})", style="dim",
                      markup=False)
            self.bar = Progress(TextColumn("  {task.description}"), BarColumn(),
                                TaskProgressColumn(), DownloadColumn(), TransferSpeedColumn(),
                                TimeRemainingColumn(), console=err)
            self.task = self.bar.add_task(ev.name, total=None)
            self.bar.start()
        from .registry import dir_size
        if ev.what == "downloaded" and ev.path is not None:
            err.print(f"[green]downloaded[/green] {escape(f'{ev.repo} → {ev.path}')} "
                      f"({human(dir_size(ev.path))})")
        elif ev.what == "present" and ev.path is not None:
            err.print(f"{ev.path} is already there; `pixlocal rm {ev.name}` to redo it",
                      style="dim", markup=False)


def _quantize_with_bar(src: Path, out: Path, bits: int) -> None:
    from pixlocal.errors import PixlocalError
    try:
        from pixlocal.quant import quantize_checkpoint
    except ImportError as e:
        raise PixlocalError(f"cannot quantize: the quantizer is unavailable ({e})") from None
    from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn
    with Progress(f"quantizing to int{bits}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("quantize", total=None)
        quantize_checkpoint(src, out, bits=bits, progress=lambda done, total: bar.update(
            task, completed=done, total=total))
    from .registry import dir_size
    err.print(f"[green]quantized[/green] {escape(str(out))} ({human(dir_size(out))})")


def pull(
    name: Annotated[str, typer.Argument(help="A model name or alias from models.toml.")],
    quant: Annotated[str | None, typer.Option(
        help="int4, int8 or none (default: the registry's default variant).")] = None,
    token: Annotated[str | None, typer.Option(
        help="Hugging Face token (default: $HF_TOKEN); gated repos need one.")] = None,
    source: Annotated[str, typer.Option(
        help="mistral (upstream) or hf (hf_upstream, Llava format).")] = "mistral",
) -> None:
    """Download a model from Hugging Face (resumable), then quantize it."""
    from . import hub
    if source not in hub.SOURCES:
        raise typer.BadParameter(f"{source!r} is not mistral or hf", param_hint="--source")
    if quant is not None and quant not in hub.QUANTS:
        raise typer.BadParameter(f"{quant!r} is not int4, int8 or none", param_hint="--quant")
    view = _PullView()
    with user_errors():
        try:
            out = hub.pull(name, quant=quant, token=token, source=source, on_event=view,
                           quantize=_quantize_with_bar)
        finally:
            view.close()
        sys.stdout.write(f"{out}\n")
        sys.stdout.flush()
        from .warmup import precompile
        precompile()  # the first `ask` then starts at once (nothing if done before)


# ---- info --------------------------------------------------------------------------------
def _info(path: Path, context: int) -> dict[str, Any]:
    from pixlocal.config import read_args
    from pixlocal.memory import param_counts

    from .registry import dir_size, quant_of
    args = read_args(path)
    counts = param_counts(args)
    quant = quant_of(path)
    v = args.vision_encoder
    return {
        "path": str(path),
        "format": ("pixlocal" if quant else "mistral") if (path / "params.json").is_file()
        else "hf",
        "quant": quant,
        "decoder": {"layers": args.n_layers, "dim": args.dim, "heads": args.n_heads,
                    "kv_heads": args.n_kv_heads, "head_dim": args.head_dim,
                    "hidden_dim": args.hidden_dim, "vocab": args.vocab_size,
                    "max_context": args.max_seq_len, "params": counts["decoder"]},
        "vision": None if v is None else {
            "layers": v.num_hidden_layers, "dim": v.hidden_size, "heads": v.num_attention_heads,
            "patch": v.patch_size, "max_image": v.image_size, "params": counts["vision"]},
        "disk_bytes": dir_size(path),
        "memory": load_estimate(path, args, quant is not None, sum(counts.values()), context),
    }


def info(
    model: Annotated[str | None, typer.Argument(
        help="Path, name or alias (default: $PIXLOCAL_MODEL, then the registry default).")
    ] = None,
    context: Annotated[int, typer.Option(min=1, help="Context length for the KV cache "
                                         "estimate.")] = 4096,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Architecture, quantization, size on disk and memory needed."""
    with user_errors():
        from .registry import resolve
        r = resolve(model)
        d = _info(r.path, context)
        d["model"] = r.label
        if as_json:
            sys.stdout.write(json.dumps(d) + "\n")
            return
        dec, vis, mem = d["decoder"], d["vision"], d["memory"]
        total = dec["params"] + (vis["params"] if vis else 0)
        lines = [
            f"model      {r.label}",
            f"path       {d['path']} ({d['format']} format, {human(d['disk_bytes'])} on disk)",
            f"params     {total / 1e9:.3g} B (decoder {dec['params']:,}"
            + (f", vision {vis['params']:,})" if vis else ")"),
            f"decoder    {dec['layers']} layers, dim {dec['dim']}, {dec['heads']} heads "
            f"({dec['kv_heads']} kv) × {dec['head_dim']}, ffn {dec['hidden_dim']}, "
            f"vocab {dec['vocab']:,}, context {dec['max_context']:,}",
            (f"vision     {vis['layers']} layer{'s' if vis['layers'] != 1 else ''}, "
             f"dim {vis['dim']}, {vis['heads']} heads, "
             f"patch {vis['patch']}, images up to {vis['max_image']} px") if vis else
            "vision     none (text only)",
            f"quant      {d['quant'] or 'none (loads as bfloat16)'}",
            f"memory     {human(mem['total_bytes'])} for a {context:,}-token context = weights "
            f"{human(mem['weights_bytes'])} + KV cache {human(mem['kv_cache_bytes'])} "
            f"({human(mem['kv_bytes_per_token'])}/token)",
        ]
        _out().print("\n".join(lines), markup=False)


# ---- rm ----------------------------------------------------------------------------------
def rm(
    model: Annotated[str, typer.Argument(help="NAME[:VARIANT] from models.toml.")],
    all_variants: Annotated[bool, typer.Option("--all", help="Every variant of NAME.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete a downloaded model (a registered one; never an arbitrary directory)."""
    with user_errors():
        from pixlocal.errors import ModelNotFound

        from .registry import dir_size, load_registry
        reg = load_registry()
        spec, variant = reg.lookup(model)
        targets = [v for v in (spec.variants.values() if all_variants else [variant])
                   if v.path.exists()]
        if not targets:
            raise ModelNotFound(f"{model}: nothing downloaded (looked in "
                                f"{', '.join(str(v.path) for v in spec.variants.values())})")
        for v in targets:
            size = human(dir_size(v.path))
            if not yes:
                try:
                    ans = err.input(escape(f"remove {spec.name}:{v.name} at {v.path} ({size})? "
                                           "[y/N] "))
                except EOFError:
                    ans = ""
                if ans.strip().lower() not in ("y", "yes"):
                    err.print("kept")
                    continue
            shutil.rmtree(v.path)
            err.print(f"removed {spec.name}:{v.name} ({size} freed)", markup=False)
