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
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
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
    IMAGE_SUFFIXES,
    ContextOpt,
    DeviceOpt,
    DtypeOpt,
    GpuLayersOpt,
    MaxImageOpt,
    MaxVramOpt,
    ModelOpt,
    ThreadsOpt,
    context_room,
    err,
    error_line,
    escape,
    load_model,
    user_errors,
)

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral
    from pixlocal.prompt import Encoded

CSV_FIELDS = ["path", "caption", "error", "tokens", "seconds"]
LOOKAHEAD = 2  # images decoded ahead of the one being captioned


def _matches(f: Path, root: Path, glob: str) -> bool:
    """--glob against the path below the folder, case-insensitively (like the suffix filter:
    '*.jpg' takes photo.JPG too)."""
    return PurePosixPath(f.relative_to(root).as_posix().lower()).match(glob.lower())


def collect(inputs: list[Path], glob: str | None, skip_txt: bool) -> list[Path]:
    found: dict[str, Path] = {}
    for p in inputs:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or (skip_txt and f.suffix.lower() == ".txt"):
                    continue
                if _matches(f, p, glob) if glob else f.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(os.path.realpath(f), f)
        elif p.exists():
            found.setdefault(os.path.realpath(p), p)
        else:
            raise typer.BadParameter(f"{p}: no such file or directory", param_hint="DIR|FILE")
    return list(found.values())


def sidecars(files: list[Path]) -> tuple[dict[str, Path], list[list[Path]]]:
    """The .txt sidecar of each image (by real path), and the groups of images in one folder
    that share a stem (case-insensitively: 'a.JPG' and 'a.png' clash on macOS too). The
    folder's other images count as well, so a run restricted by --glob never takes a name
    that a run over the whole folder gives another image."""
    listing: dict[Path, list[Path]] = {}
    for p in files:
        d = p.parent
        if d not in listing:
            try:
                listing[d] = [q for q in d.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES]
            except OSError:
                listing[d] = []
    groups: dict[tuple[Path, str], set[str]] = {}
    for d, names in listing.items():
        for q in names:
            groups.setdefault((d, q.stem.lower()), set()).add(q.name)
    for p in files:
        groups.setdefault((p.parent, p.stem.lower()), set()).add(p.name)
    side, clashes = {}, []
    for p in files:
        names = groups[(p.parent, p.stem.lower())]
        side[os.path.realpath(p)] = p.parent / (f"{p.name}.txt" if len(names) > 1
                                                else f"{p.stem}.txt")
    for (d, _), names in groups.items():
        if len(names) > 1:
            clashes.append([d / n for n in sorted(names)])
    return side, clashes


def _fsync(f: IO[str]) -> None:
    f.flush()
    try:
        os.fsync(f.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # a pipe, a device or a test's captured stream: flushed is all there is


def _record_path(p: Path) -> str:
    return os.path.abspath(p)


class Sink:
    """Where records go; `done` holds the real paths already recorded."""

    def __init__(self, fmt: str, out: Path | None, resume: bool, overwrite: bool,
                 files: list[Path]):
        from pixlocal.errors import PixlocalError
        self.fmt, self.out, self.done = fmt, out, set[str]()
        self.stream: IO[str] = sys.stdout
        self.console: Console | None = None  # set: records are printed through it
        self.failed = False
        self.side, self.clashes = sidecars(files) if fmt == "txt" else ({}, [])
        if fmt == "txt":
            return
        if out is None:
            if fmt == "csv":
                self._csv_header()
            return
        if out.is_dir():
            raise PixlocalError(f"{out} is a directory: -o takes a file name")
        exists = out.is_file() and out.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise typer.BadParameter(f"{out} exists: pass --resume to continue it or "
                                     "--overwrite to replace it", param_hint="-o")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.stream = open(out, "a", encoding="utf-8", newline="")  # truncated once locked
        except OSError as e:
            why = (f"{out.parent} is not a directory" if out.parent.exists() and
                   not out.parent.is_dir() else e.strerror or str(e))
            raise PixlocalError(f"{out}: cannot write ({why})") from None
        self._lock(out)
        if exists and resume:
            self._load_done(out)
        elif out.is_file():
            self.stream.truncate(0)
        if not (exists and resume) and fmt == "csv":
            self._csv_header()

    def _lock(self, out: Path) -> None:
        from pixlocal.errors import PixlocalError
        try:
            fcntl.flock(self.stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.stream.close()
            raise PixlocalError(f"{out} is being written by another `pixlocal caption` run "
                                "(it is locked): wait for it, or pick another -o") from None
        except OSError:
            pass  # a file system without locks: go on unlocked

    def _csv_header(self) -> None:
        self._emit(lambda f: csv.writer(f, lineterminator="\n").writerow(CSV_FIELDS))

    def _load_done(self, out: Path) -> None:
        from pixlocal.errors import FormatError
        text = out.read_bytes().decode("utf-8", errors="replace")
        recorded: list[str] = []
        if self.fmt == "jsonl":
            good = text[: text.rfind("\n") + 1]  # a killed run may leave half a line
            for i, line in enumerate(good.splitlines(), 1):
                try:
                    recorded.append(str(json.loads(line)["path"]))
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
            recorded += [r["path"] for r in rows]
        for r in recorded:
            if os.path.isabs(r):
                self.done.add(os.path.realpath(r))
            else:  # written by an older pixlocal, relative to its working directory
                self.done.add(os.path.realpath(r))
                self.done.add(os.path.realpath(out.parent / r))
        if len(good.encode()) != out.stat().st_size:
            self.stream.truncate(len(good.encode()))  # drop the torn record

    def sidecar(self, p: Path) -> Path:
        return self.side[os.path.realpath(p)]

    def already(self, p: Path) -> bool:
        if self.fmt == "txt":
            return self.sidecar(p).is_file()
        return os.path.realpath(p) in self.done

    def _emit(self, write: Any) -> None:
        """Run write(stream), flushed and fsynced; a write that fails (a full disk) stops the
        run with one line naming the file."""
        from pixlocal.errors import PixlocalError
        if self.console is not None:
            buf = io.StringIO()
            write(buf)
            self.console.print(Text(buf.getvalue().rstrip("\n")), soft_wrap=True)
            return
        try:
            write(self.stream)
            _fsync(self.stream)
        except OSError as e:
            if e.errno is None or isinstance(e, BrokenPipeError):
                raise
            self.failed = True
            where = self.out if self.out is not None else "stdout"
            raise PixlocalError(f"{where}: cannot write a record ({e.strerror}); the records "
                                "before it are kept") from None

    def write(self, rec: dict[str, Any], p: Path) -> None:
        if self.fmt == "jsonl":
            line = json.dumps(rec, ensure_ascii=False) + "\n"
            self._emit(lambda f: f.write(line))
        elif self.fmt == "csv":
            row = [rec.get(k, "") for k in CSV_FIELDS]
            self._emit(lambda f: csv.writer(f, lineterminator="\n").writerow(row))
        elif "caption" in rec:  # txt: errors go to stderr only; a rerun retries them
            side = self.sidecar(p)
            tmp = side.with_name(f".{side.name}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(rec["caption"] + "\n")
                _fsync(f)
            os.replace(tmp, side)  # atomic: a sidecar that exists is complete

    def close(self) -> None:
        if self.stream is sys.stdout:
            return
        try:
            self.stream.close()  # also drops the lock
        except OSError:
            if not self.failed:
                raise


def _same_terminal() -> bool:
    """Records on stdout and the progress bar on stderr share one screen."""
    try:
        return sys.stdout.isatty() and err.is_terminal and os.path.samestat(
            os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


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
) -> None:
    """Caption every image in folders or files; one record per image."""
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
        files = collect(inputs, glob, skip_txt=fmt == "txt")
        if not files:
            where = ", ".join(str(p) for p in inputs)
            raise PixlocalError(f"no images found in {where}" +
                                (f" matching {glob!r}" if glob else ""))
        sink = Sink(fmt, output, resume, overwrite, files)
        try:
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
            if not todo:
                err.print(f"nothing to do: {len(files)} image(s), all already captioned")
                return
            m, load_s, label = load_model(model, device=device, dtype=dtype,
                                          max_image_size=max_image_size, gpu_layers=gpu_layers,
                                          max_vram=max_vram, context=context, threads=threads)
            err.print(f"{escape(label)} loaded in {load_s:.1f} s · {len(todo)} image(s)"
                      + (f", {skipped} already done" if skipped else ""), style="dim")
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
            if sink.out is None and sink.fmt != "txt" and _same_terminal():
                sink.console = progress.console  # records print above the bar, not into it
            task = progress.add_task("captioning", total=len(todo))
            fill()
            while queue:
                p, fut = queue.popleft()
                fill()
                t1 = time.perf_counter()
                try:
                    enc = fut.result()
                    room = context_room(m, len(enc.tokens))
                    steps = list(m.stream_encoded(  # stops at the context's end
                        enc, **{**gen, "max_tokens": min(gen["max_tokens"], max(room, 1))}))
                    rec: dict[str, Any] = {
                        "path": _record_path(p), "caption": "".join(s.text for s in steps).strip(),
                        "tokens": len(steps), "seconds": round(time.perf_counter() - t1, 3)}
                    done += 1
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one bad image must not stop a run
                    if not isinstance(e, PixlocalError) and fut.exception() is None:
                        raise  # a failure in generation itself is a bug, not a bad image
                    rec = {"path": _record_path(p), "error": _error_text(p, e)}
                    failed += 1
                    error_line(rec["error"])  # err is the progress console: above the bar
                sink.write(rec, p)
                progress.advance(task)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        err.print(f"[yellow]interrupted[/yellow] after {done} captioned, {failed} failed; "
                  "what is recorded is kept: rerun with --resume to finish")
        raise typer.Exit(130) from None
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    secs = time.perf_counter() - t0
    err.print(f"captioned {done}, failed {failed}" + (f", skipped {skipped}" if skipped else "")
              + f" in {secs:.1f} s ({(done + failed) / secs:.2f} img/s)")
    if failed:
        raise typer.Exit(1)
