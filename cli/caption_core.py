"""caption's parts shared by a local run, `--ray` workers (caption_ray.py) and `caption
merge` (caption_merge.py): collecting images and their shard, the output sink (records
fsynced one by one, --resume, the -o lock, sidecars), `Captioner` (one image → one record,
the prompt's prefix reused from the model's prompt cache), the progress bar and summary."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import re
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import typer
import typer.main
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
    IMAGE_SUFFIXES,
    context_room,
    err,
)

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral
    from pixlocal.prompt import Encoded

CSV_FIELDS = ["path", "caption", "error", "tokens", "seconds"]
LOOKAHEAD = 2  # images decoded ahead of the one being captioned
RAY_ADDRESS = r"local|auto|(ray://)?([\w.\-]+|\[[0-9a-fA-F:.]+\]):\d+"  # --ray's values


def _matches(f: Path, root: Path, glob: str) -> bool:
    """--glob against the path below the folder, case-insensitively (like the suffix filter:
    '*.jpg' takes photo.JPG too)."""
    return PurePosixPath(f.relative_to(root).as_posix().lower()).match(glob.lower())


def collect_keyed(inputs: list[Path], glob: str | None, skip_txt: bool
                  ) -> list[tuple[Path, str]]:
    """The images under `inputs`, each with its shard key: its path below the input folder
    that found it (a file given by name: its name)."""
    found: dict[str, tuple[Path, str]] = {}
    for p in inputs:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if not f.is_file() or (skip_txt and f.suffix.lower() == ".txt"):
                    continue
                if _matches(f, p, glob) if glob else f.suffix.lower() in IMAGE_SUFFIXES:
                    found.setdefault(os.path.realpath(f), (f, f.relative_to(p).as_posix()))
        elif p.exists():
            found.setdefault(os.path.realpath(p), (p, p.name))
        else:
            raise typer.BadParameter(f"{p}: no such file or directory", param_hint="DIR|FILE")
    return list(found.values())


def collect(inputs: list[Path], glob: str | None, skip_txt: bool) -> list[Path]:
    return [p for p, _ in collect_keyed(inputs, glob, skip_txt)]


def shard_of(key: str, n: int) -> int:
    """Which of n shards takes the image with this key (its path below its input folder).
    A hash of the NFC-normalised UTF-8 key: the same on every machine, whatever the order
    of discovery, the mount point or the file system's Unicode form (macOS writes NFD)."""
    h = hashlib.blake2b(unicodedata.normalize("NFC", key).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") % n


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """--shard I/N (0 <= I < N): a usage error for anything else."""
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m:
        raise typer.BadParameter(f"{value!r} is not I/N (e.g. 0/4: the first of 4 shards)",
                                 param_hint="--shard")
    i, n = int(m[1]), int(m[2])
    if n < 1:
        raise typer.BadParameter(f"{value!r}: N must be at least 1", param_hint="--shard")
    if i >= n:
        raise typer.BadParameter(f"{value!r}: I must be 0..{n - 1} (shards count from 0)",
                                 param_hint="--shard")
    return i, n


def in_shard(keyed: list[tuple[Path, str]], shard: tuple[int, int] | None) -> list[Path]:
    if shard is None:
        return [p for p, _ in keyed]
    i, n = shard
    return [p for p, k in keyed if shard_of(k, n) == i]


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


def read_records(out: Path, fmt: str) -> tuple[list[dict[str, Any]], int]:
    """The complete records of a jsonl or csv caption file, and its length in bytes up to the
    end of the last of them (a run killed mid-write may leave half a record; it is not one).
    FormatError naming the file and the line for anything that is not a caption record."""
    from pixlocal.errors import FormatError
    text = out.read_bytes().decode("utf-8", errors="replace")
    recorded: list[dict[str, Any]] = []
    if fmt == "jsonl":
        good = text[: text.rfind("\n") + 1]
        for i, line in enumerate(good.splitlines(), 1):
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
                    raise TypeError
            except (json.JSONDecodeError, TypeError):
                raise FormatError(f"{out}: line {i} is not a caption record") from None
            recorded.append(rec)
    else:  # csv: a record ends at a newline outside quotes ("" escapes keep the parity)
        end = text.rfind("\n")
        while end >= 0 and text.count('"', 0, end) % 2:
            end = text.rfind("\n", 0, end)
        good = text[: end + 1]
        rows = list(csv.DictReader(io.StringIO(good)))
        if good and (not rows and not good.startswith("path,") or
                     rows and "path" not in rows[0]):
            raise FormatError(f"{out}: not a caption CSV (no path column)")
        recorded += [dict(r) for r in rows]
    return recorded, len(good.encode())


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
        recorded, good = read_records(out, self.fmt)
        for r in recorded:
            if os.path.isabs(r["path"]):
                self.done.add(os.path.realpath(r["path"]))
            else:  # written by an older pixlocal, relative to its working directory
                self.done.add(os.path.realpath(r["path"]))
                self.done.add(os.path.realpath(out.parent / r["path"]))
        if good != out.stat().st_size:
            self.stream.truncate(good)  # drop the torn record

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


class Captioner:
    """The per-image work of every run (local, a shard, a Ray worker): a loaded model, the
    prompt, the generation settings. `records` yields one record per image in order while a
    background thread decodes and preprocesses the next LOOKAHEAD images.

    Every image is prompted as [system] + image + prompt, so the tokens before the image are
    the same for all of them: the model's prompt cache keeps them from the previous image and
    only the image's own tokens and the prompt after it are computed (`cached` counts the
    prompt tokens taken from the cache)."""

    def __init__(self, m: Pixtral, prompt: str, system: str | None, gen: dict[str, Any]):
        self.m, self.prompt, self.system, self.gen = m, prompt, system, gen
        self.cached = 0  # prompt tokens reused from the cache, over all images so far

    def caption(self, p: Path, enc: Encoded) -> dict[str, Any]:
        t1 = time.perf_counter()
        room = context_room(self.m, len(enc.tokens))
        steps = list(self.m.stream_encoded(  # stops at the context's end
            enc, **{**self.gen, "max_tokens": min(self.gen["max_tokens"], max(room, 1))}))
        if steps:
            self.cached += steps[-1].prompt_tokens - steps[-1].prefilled_tokens
        return {"path": _record_path(p), "caption": "".join(s.text for s in steps).strip(),
                "tokens": len(steps), "seconds": round(time.perf_counter() - t1, 3)}

    def records(self, paths: Iterable[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(image, record) for each image: a caption, or an `error` for an image that cannot
        be read. A failure in generation itself is a bug, not a bad image: it is raised."""
        from pixlocal.errors import PixlocalError
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        queue: deque[tuple[Path, Future[Encoded]]] = deque()
        pending = iter(paths)

        def fill() -> None:
            while len(queue) < LOOKAHEAD + 1:
                p = next(pending, None)
                if p is None:
                    return
                queue.append((p, pool.submit(_prepare, self.m, p, self.prompt, self.system)))

        try:
            fill()
            while queue:
                p, fut = queue.popleft()
                fill()
                try:
                    rec = self.caption(p, fut.result())
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # one bad image must not stop a run
                    if not isinstance(e, PixlocalError) and fut.exception() is None:
                        raise
                    rec = {"path": _record_path(p), "error": _error_text(p, e)}
                yield p, rec
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def progress_bar() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(), TextColumn("eta"),
                    TimeRemainingColumn(), console=err, transient=False)


def summary(done: int, failed: int, skipped: int, secs: float, cached: int,
            note: str = "") -> str:
    return (f"captioned {done}, failed {failed}" + (f", skipped {skipped}" if skipped else "")
            + f" in {secs:.1f} s ({(done + failed) / max(secs, 1e-9):.2f} img/s{note})"
            + (f"; {cached} prompt tokens reused from the cache" if cached else ""))
