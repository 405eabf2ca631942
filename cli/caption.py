"""`pixlocal caption DIR|FILE...`: caption many images with one model load.

Records go to stdout or -o FILE (jsonl, csv) or to a sidecar `photo.txt` per image (txt), each
flushed and fsynced as soon as it exists, so Ctrl-C, a crash or a kill loses nothing already
done and `--resume` skips what is recorded (failed images included: one record per image).
While the model writes one caption, a background thread decodes and preprocesses the next.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

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
    escape,
    load_model,
    user_errors,
)

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral
    from pixlocal.prompt import Encoded

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic",
                  ".heif", ".avif", ".jxl"}  # the last four are reported when unsupported
CSV_FIELDS = ["path", "caption", "error", "tokens", "seconds"]
LOOKAHEAD = 2  # images decoded ahead of the one being captioned


def collect(inputs: list[Path], glob: str | None, skip_txt: bool) -> list[Path]:
    found: dict[str, Path] = {}
    for p in inputs:
        if p.is_dir():
            for f in sorted(p.rglob(glob or "*")):
                if not f.is_file() or (skip_txt and f.suffix.lower() == ".txt"):
                    continue
                if glob or f.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(os.path.abspath(f), f)
        elif p.exists():
            found.setdefault(os.path.abspath(p), p)
        else:
            raise typer.BadParameter(f"{p}: no such file or directory", param_hint="DIR|FILE")
    return list(found.values())


def _fsync(f: IO[str]) -> None:
    f.flush()
    try:
        os.fsync(f.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # a pipe or a test's captured stream: flushed is all there is


class Sink:
    """Where records go; `done` holds the absolute paths already recorded."""

    def __init__(self, fmt: str, out: Path | None, resume: bool, overwrite: bool):
        self.fmt, self.out, self.done = fmt, out, set[str]()
        self.stream: IO[str] = sys.stdout
        if fmt == "txt":
            return
        if out is None:
            if resume:
                raise typer.BadParameter("--resume needs -o FILE (or --format txt)")
            if fmt == "csv":
                self._csv_header()
            return
        exists = out.is_file() and out.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise typer.BadParameter(f"{out} exists: pass --resume to continue it or "
                                     "--overwrite to replace it", param_hint="-o")
        if exists and resume:
            self._load_done(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(out, "a" if resume else "w", encoding="utf-8", newline="")
        if not (exists and resume) and fmt == "csv":
            self._csv_header()

    def _csv_header(self) -> None:
        csv.writer(self.stream, lineterminator="\n").writerow(CSV_FIELDS)
        _fsync(self.stream)

    def _load_done(self, out: Path) -> None:
        from pixlocal.errors import FormatError
        text = out.read_bytes().decode("utf-8", errors="replace")
        if self.fmt == "jsonl":
            good = text[: text.rfind("\n") + 1]  # a killed run may leave half a line
            for i, line in enumerate(good.splitlines(), 1):
                try:
                    self.done.add(os.path.abspath(json.loads(line)["path"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise FormatError(f"{out}: line {i} is not a caption record") from None
        else:  # csv: a record ends at a newline outside quotes ("" escapes keep the parity)
            end = text.rfind("\n")
            while end >= 0 and text.count('"', 0, end) % 2:
                end = text.rfind("\n", 0, end)
            good = text[: end + 1]
            rows = list(csv.DictReader(io.StringIO(good)))
            if good and (not rows and not good.startswith("path,") or
                         rows and "path" not in rows[0]):
                raise FormatError(f"{out}: not a caption CSV (no path column)")
            self.done.update(os.path.abspath(r["path"]) for r in rows)
        if len(good.encode()) != out.stat().st_size:
            with open(out, "r+b") as f:  # drop the torn record so appends start on a line
                f.truncate(len(good.encode()))

    def already(self, p: Path) -> bool:
        if self.fmt == "txt":
            return p.with_suffix(".txt").is_file()
        return os.path.abspath(p) in self.done

    def write(self, rec: dict[str, Any], p: Path) -> None:
        if self.fmt == "jsonl":
            self.stream.write(json.dumps(rec, ensure_ascii=False) + "\n")
        elif self.fmt == "csv":
            csv.writer(self.stream, lineterminator="\n").writerow(
                [rec.get(k, "") for k in CSV_FIELDS])
        elif "caption" in rec:  # txt: errors go to stderr only; a rerun retries them
            side = p.with_suffix(".txt")
            tmp = side.with_name(f".{side.name}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(rec["caption"] + "\n")
                _fsync(f)
            os.replace(tmp, side)  # atomic: a sidecar that exists is complete
            return
        else:
            return
        _fsync(self.stream)

    def close(self) -> None:
        if self.stream is not sys.stdout:
            self.stream.close()


class RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        return Text(f"{task.speed:.2f} img/s" if task.speed else "– img/s", style="dim")


def _prepare(m: Pixtral, p: Path, prompt: str, system: str | None) -> Encoded:
    from pixlocal.images import load_image
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [
        {"type": "image", "image": load_image(p)}, {"type": "text", "text": prompt}]}]
    if system:
        msgs.insert(0, {"role": "system", "content": system})
    return m.encode(msgs)


def _error_text(p: Path, e: BaseException) -> str:
    from pixlocal.errors import PixlocalError
    msg = str(e) if isinstance(e, PixlocalError) else f"{type(e).__name__}: {e}"
    msg = " ".join(msg.split())
    return msg if str(p) in msg else f"{p}: {msg}"


def caption(
    inputs: Annotated[list[Path], typer.Argument(
        help="Images and folders (searched recursively).", metavar="DIR|FILE...")],
    model: ModelOpt = None,
    prompt: Annotated[str, typer.Option(help="What to ask about each image.")] =
        "Describe this image in one or two sentences.",
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    glob: Annotated[str | None, typer.Option(
        help="Only files matching this pattern, e.g. '*.jpg' (default: image suffixes).")
    ] = None,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="jsonl, csv, or txt (a sidecar photo.txt per image).")] = "jsonl",
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
) -> None:
    """Caption every image in folders or files; one record per image."""
    if fmt not in ("jsonl", "csv", "txt"):
        raise typer.BadParameter(f"{fmt!r} is not one of jsonl, csv, txt", param_hint="--format")
    if resume and overwrite:
        raise typer.BadParameter("--resume and --overwrite exclude each other")
    if output is not None and fmt == "txt":
        raise typer.BadParameter("--format txt writes sidecars next to the images; drop -o")
    with user_errors():
        files = collect(inputs, glob, skip_txt=fmt == "txt")
        sink = Sink(fmt, output, resume, overwrite)
        try:
            todo = [p for p in files if not (resume and sink.already(p))]
            if fmt == "txt" and not (resume or overwrite):
                clash = [p for p in todo if sink.already(p)]
                if clash:
                    raise typer.BadParameter(
                        f"{len(clash)} image(s) already have a .txt sidecar (e.g. "
                        f"{clash[0].with_suffix('.txt')}): pass --resume or --overwrite")
            skipped = len(files) - len(todo)
            if not todo:
                err.print(f"nothing to do: {len(files)} image(s), all already captioned"
                          if files else "no images found")
                return
            m, load_s, label = load_model(model, device=device, dtype=dtype,
                                          max_image_size=max_image_size, gpu_layers=gpu_layers,
                                          max_vram=max_vram, context=context)
            err.print(f"[dim]{label} loaded in {load_s:.1f} s · {len(todo)} image(s)"
                      + (f", {skipped} already done" if skipped else "") + "[/dim]")
            _run(m, todo, sink, prompt, system, skipped,
                 dict(max_tokens=max_tokens, temperature=temperature, seed=seed))
        finally:
            sink.close()


def _run(m: Pixtral, todo: list[Path], sink: Sink, prompt: str, system: str | None,
         skipped: int, gen: dict[str, Any]) -> None:
    from pixlocal.errors import PixlocalError
    done = failed = 0
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
    queue: deque[tuple[Path, Future[Encoded]]] = deque()
    pending = iter(todo)

    def fill() -> None:
        while len(queue) < LOOKAHEAD + 1:
            p = next(pending, None)
            if p is None:
                return
            queue.append((p, pool.submit(_prepare, m, p, prompt, system)))

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("captioning", total=len(todo))
            fill()
            while queue:
                p, fut = queue.popleft()
                fill()
                t1 = time.perf_counter()
                try:
                    enc = fut.result()
                    steps = list(m.stream_encoded(enc, **gen))
                    rec: dict[str, Any] = {
                        "path": str(p), "caption": "".join(s.text for s in steps).strip(),
                        "tokens": len(steps), "seconds": round(time.perf_counter() - t1, 3)}
                    done += 1
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one bad image must not stop a run
                    if not isinstance(e, PixlocalError) and fut.exception() is None:
                        raise  # a failure in generation itself is a bug, not a bad image
                    rec = {"path": str(p), "error": _error_text(p, e)}
                    failed += 1
                    progress.console.print(f"[red]error:[/red] {rec['error']}", soft_wrap=True,
                                           markup=True, highlight=False)
                sink.write(rec, p)
                progress.advance(task)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        err.print(f"[yellow]interrupted[/yellow] after {done} captioned, {failed} failed; "
                  "what is recorded is kept: rerun with --resume to finish")
        raise typer.Exit(130) from None
    pool.shutdown(wait=True)
    secs = time.perf_counter() - t0
    err.print(f"captioned {done}, failed {failed}" + (f", skipped {skipped}" if skipped else "")
              + f" in {secs:.1f} s ({(done + failed) / secs:.2f} img/s)")
    if failed:
        raise typer.Exit(1)
