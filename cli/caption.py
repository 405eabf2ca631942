"""`pixlocal caption DIR|FILE...`: caption many images with one model load.

Records go to stdout or -o FILE (jsonl, csv) or to a sidecar `photo.txt` per image (txt), each
flushed and fsynced as soon as it exists, so Ctrl-C, a crash or a kill loses nothing already
done and `--resume` skips what is recorded (failed images included: one record per image).
While the model writes one caption, a background thread decodes and preprocesses the next.

A record's path is the image's absolute path, and --resume compares real paths, so a run
resumes from any directory. -o FILE is locked (flock) while a run writes it: a second run on
the same file refuses. A sidecar is `photo.txt`, as dataset tools expect, unless another image
in the folder has the same stem (`photo.jpg`, `photo.png`): then each gets `photo.jpg.txt`,
`photo.png.txt`, so no caption overwrites another.

At scale: `--shard I/N` takes the images whose path below its input folder hashes to shard I
of N (the same split on every machine and every rerun), so N processes anywhere each caption
their share into their own output, and `pixlocal caption merge` (caption_merge.py) joins and
checks them. `--ray [ADDRESS]` runs the same records through a pool of Ray workers
(caption_ray.py), this process still the only writer. Both use `Captioner`, the per-image
code of a local run. The prompt's text before the image (system prompt included) is
computed once per process: each image reuses it from the model's prompt cache.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import typer.main
from typer.core import TyperCommand

from .common import (
    DEFAULT_CONTEXT,
    ContextOpt,
    DeviceOpt,
    DtypeOpt,
    GpuLayersOpt,
    MaxImageOpt,
    MaxVramOpt,
    ModelOpt,
    ThreadsOpt,
    err,
    error_line,
    escape,
    load_model,
    user_errors,
)

if TYPE_CHECKING:
    pass

from .caption_core import (
    RAY_ADDRESS,
    Captioner,
    Sink,
    _same_terminal,
    collect_keyed,
    in_shard,
    parse_shard,
    progress_bar,
    summary,
)


class CaptionCommand(TyperCommand):
    """`caption`'s command: `caption merge ...` is the merge command (caption_merge.py; a
    folder named merge is `./merge`), and a bare --ray means --ray=local: typer's options take
    no optional value, so --ray takes the next word only when it is a Ray address."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: Any = None, **extra: Any) -> Any:
        if args[:1] == ["merge"]:
            from .caption_merge import merge
            sub = typer.Typer(add_completion=False)
            sub.command()(merge)
            cmd = typer.main.get_command(sub)
            return cmd.make_context(f"{info_name} merge", args[1:], parent=parent, **extra)
        end = args.index("--") if "--" in args else len(args)
        args = [("--ray=local" if a == "--ray" and not (
            i + 1 < end and re.fullmatch(RAY_ADDRESS, args[i + 1])) else a) if i < end else a
            for i, a in enumerate(args)]
        return super().make_context(info_name, args, parent=parent, **extra)


def caption(
    inputs: Annotated[list[Path], typer.Argument(
        help="Images and folders (searched recursively).", metavar="DIR|FILE...")],
    model: ModelOpt = None,
    prompt: Annotated[str, typer.Option(help="What to ask about each image.")] =
        "Describe this image in one or two sentences.",
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    glob: Annotated[str | None, typer.Option(
        help="Only files matching this pattern, any case, e.g. '*.jpg' (default: image "
             "suffixes).")
    ] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="jsonl, csv, or txt (a sidecar photo.txt per image; "
        "photo.jpg.txt where two images share a name).")] = "jsonl",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write jsonl/csv records here instead of stdout.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip images already recorded.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output.")] = False,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per caption.")] = 200,
    temperature: Annotated[float, typer.Option(
        "--temperature", "--temp", min=0.0, help="0 is greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    max_image_size: MaxImageOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    gpu_layers: GpuLayersOpt = "auto",
    max_vram: MaxVramOpt = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    threads: ThreadsOpt = None,
    shard: Annotated[str | None, typer.Option(
        help="Caption only shard I of N (0 <= I < N), e.g. --shard $SLURM_ARRAY_TASK_ID/8: "
             "images are split by a hash of their path below the folder, the same on every "
             "machine. Join the outputs with `pixlocal caption merge`.", metavar="I/N")
    ] = None,
    ray: Annotated[str | None, typer.Option(
        "--ray", metavar="[ADDRESS]",
        help="Run on a Ray cluster: ADDRESS (host:port, ray://host:port, auto: the cluster "
             "`ray start` made here), or alone for a Ray instance on this machine only; this "
             "process writes the output. Needs pip install 'pixlocal[ray]'.")
    ] = None,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Ray workers, one model each (default: one per GPU, or one per machine "
                    "without GPUs).")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option(
        min=0.0, help="GPUs per Ray worker (default: 1 where the cluster has GPUs, else 0).")
    ] = None,
) -> None:
    """Caption every image in folders or files; one record per image.

    At scale: --shard I/N for any scheduler (then `pixlocal caption merge SHARD... -o OUT
    --images DIR`), or --ray for a Ray cluster."""
    part = parse_shard(shard)
    if ray is None and (workers is not None or gpus_per_worker is not None):
        raise typer.BadParameter("--workers and --gpus-per-worker go with --ray",
                                 param_hint="--workers")
    if ray is not None:
        from .caption_ray import check_address, check_reachable, import_ray, on_loopback
        check_address(ray)
    if fmt not in ("jsonl", "csv", "txt"):
        raise typer.BadParameter(f"{fmt!r} is not one of jsonl, csv, txt", param_hint="--format")
    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")
    if output is not None and fmt == "txt":
        raise typer.BadParameter("--format txt writes sidecars next to the images; drop -o")
    if resume and output is None and fmt != "txt":
        raise typer.BadParameter("--resume needs -o FILE (or --format txt)")
    with user_errors():
        from pixlocal.errors import PixlocalError
        if ray is not None:
            import_ray(local=on_loopback(ray))  # one line saying how to install it, up front
            check_reachable(ray)  # and one where nothing answers at ADDRESS
        files = collect_keyed(inputs, glob, skip_txt=fmt == "txt")
        if not files:
            where = ", ".join(str(p) for p in inputs)
            raise PixlocalError(f"no images found in {where}" +
                                (f" matching {glob!r}" if glob else ""))
        every = len(files)
        files = in_shard(files, part)
        sink = Sink(fmt, output, resume, overwrite, files)  # an empty shard: an empty output
        try:
            if not files:
                err.print(f"shard {shard}: none of the {every} image(s) falls in this shard")
                return
            for group in sink.clashes:
                err.print(f"note: {' and '.join(p.name for p in group)} in {group[0].parent} "
                          f"share a name: their captions go to "
                          f"{', '.join(p.name + '.txt' for p in group)}",
                          style="yellow", markup=False, soft_wrap=True)
            todo = [p for p in files if not (resume and sink.already(p))]
            if fmt == "txt" and not (resume or overwrite):
                clash = [p for p in todo if sink.already(p)]
                if clash:
                    raise typer.BadParameter(
                        f"{len(clash)} image(s) already have a .txt sidecar (e.g. "
                        f"{sink.sidecar(clash[0])}): pass --resume or --overwrite")
            skipped = len(files) - len(todo)
            of = f" (shard {part[0]}/{part[1]} of {every})" if part else ""
            if not todo:
                err.print(f"nothing to do: {len(files)} image(s){of}, all already captioned")
                return
            gen = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
            if ray is not None:
                from .caption_ray import run_ray
                from .common import placement_kw
                from .registry import resolve
                load_kw = dict(device=device, dtype=dtype, max_image_size=max_image_size,
                               threads=threads,
                               **placement_kw(gpu_layers, max_vram, context))
                with err.status("preparing the model …"):
                    r = resolve(model)
                run_ray(None if ray == "local" else ray, workers, gpus_per_worker, r.path,
                        r.label, load_kw, todo, sink, prompt, system, skipped, gen)
                return
            m, load_s, label = load_model(model, device=device, dtype=dtype,
                                          max_image_size=max_image_size, gpu_layers=gpu_layers,
                                          max_vram=max_vram, context=context, threads=threads)
            err.print(f"{escape(label)} loaded in {load_s:.1f} s · {len(todo)} image(s){of}"
                      + (f", {skipped} already done" if skipped else ""), style="dim")
            _run(Captioner(m, prompt, system, gen), todo, sink, skipped)
        finally:
            sink.close()


def _run(cap: Captioner, todo: list[Path], sink: Sink, skipped: int) -> None:
    done = failed = 0
    t0 = time.perf_counter()
    try:
        with progress_bar() as progress:
            if sink.out is None and sink.fmt != "txt" and _same_terminal():
                sink.console = progress.console  # records print above the bar, not into it
            task = progress.add_task("captioning", total=len(todo))
            for p, rec in cap.records(todo):
                if "error" in rec:
                    failed += 1
                    error_line(rec["error"])  # err is the progress console: above the bar
                else:
                    done += 1
                sink.write(rec, p)
                progress.advance(task)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/yellow] after {done} captioned, {failed} failed; "
                  "what is recorded is kept: rerun with --resume to finish")
        raise typer.Exit(130) from None
    err.print(summary(done, failed, skipped, time.perf_counter() - t0, cap.cached))
    if failed:
        raise typer.Exit(1)
