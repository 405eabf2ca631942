"""`pixlocal caption --ray [ADDRESS]`: the same records from a pool of Ray workers.

Each worker (a Ray actor) loads one model and captions the batches of image paths it is
given with `caption.Captioner`, the code of a local run, reading the images from the shared
path; each record streams back as soon as it exists (a streaming generator). This process
stays the only writer of the output (`caption.Sink`: jsonl, csv or the .txt sidecars), so
--resume, the lock on -o and "one record per image" hold exactly as they do locally. A worker
that dies (killed, out of memory, its machine gone) is replaced and the images of its batch
that came back with no record go to the front of the queue; an image whose worker died
RETRIES + 1 times is recorded as an error instead of being tried forever.

Without ADDRESS a Ray instance is started on this machine only: its servers listen on the
loopback interface. ADDRESS joins a running cluster (`ray start --head` on one machine,
`ray start --address HEAD:6379` on the others): the model and the images must be at the same
path on every machine.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from .caption_core import (
    RAY_ADDRESS,
    Captioner,
    Sink,
    _record_path,
    _same_terminal,
    progress_bar,
    summary,
)
from .common import err, error_line, escape

if TYPE_CHECKING:
    from collections.abc import Iterator

RETRIES = 2  # more tries for an image whose worker died under it
BATCH = 8  # most images handed to a worker at once (a dead worker's loss is at most this)
LOAD_DEATHS = 2  # per worker slot: workers that died while loading before the run gives up


def check_address(value: str) -> None:
    """--ray's value (a bare --ray is --ray=local: caption.CaptionCommand): a usage error
    for what is not a Ray address."""
    if not re.fullmatch(RAY_ADDRESS, value):
        raise typer.BadParameter(f"{value!r} is not a Ray address (host:port, "
                                 "ray://host:port, auto or local)", param_hint="--ray")


def _host_port(address: str) -> tuple[str, int] | None:
    if address in ("local", "auto"):
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return host.strip("[]"), int(port)


def on_loopback(address: str) -> bool:
    """A cluster on this machine's loopback interface (as `--ray` alone makes one)."""
    import ipaddress
    hp = _host_port(address)
    if hp is None:
        return address == "local"
    try:
        return hp[0] == "localhost" or ipaddress.ip_address(hp[0]).is_loopback
    except ValueError:
        return False


def check_reachable(address: str) -> None:
    """One line, in seconds, where nothing answers at host:port (Ray itself retries for
    minutes, logging as it goes)."""
    from pixlocal.errors import PixlocalError
    hp = _host_port(address)
    if hp is None:
        return
    try:
        socket.create_connection(hp, timeout=5).close()
    except OSError as e:
        raise PixlocalError(f"--ray {address}: nothing answers there ({e.strerror or e}); "
                            "is `ray start --head` running on that machine?") from None


def import_ray(local: bool) -> Any:
    """The ray module, or one line saying how to install it. A local instance is kept on the
    loopback interface: Ray then takes 127.0.0.1 as the node's address and binds its servers
    there (read once, when ray is first imported)."""
    from pixlocal.errors import PixlocalError
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise PixlocalError("--ray needs Ray, which is not installed: "
                            "pip install 'pixlocal[ray]'") from None
    return ray


class CaptionWorker:
    """One model in one Ray worker process (made a Ray actor by `_actor_class`)."""

    def __init__(self, model: str, load_kw: dict[str, Any], prompt: str, system: str | None,
                 gen: dict[str, Any]):
        self.node, self.failure = socket.gethostname(), None
        t0 = time.perf_counter()
        try:  # a failure is reported by ready(), as one line, not as a dead actor
            import pixlocal
            from pixlocal.kernels import jit

            from .warm import needs_warmup, warmup
            if not Path(model).exists():
                raise FileNotFoundError(f"{model}: no such model directory on {self.node} "
                                        "(every Ray node needs the model at the same path)")
            m = pixlocal.load(model, **load_kw)
            if needs_warmup(m):
                warmup(m)
            else:
                jit.preload()
            self.cap = Captioner(m, prompt, system, gen)
        except Exception as e:
            self.failure = " ".join(str(e).split()) or type(e).__name__
        self.load_s = time.perf_counter() - t0

    def ready(self) -> tuple[str | None, str, float]:
        return self.failure, self.node, self.load_s

    def caption(self, paths: list[str]) -> Iterator[tuple[dict[str, Any], int]]:
        """(record, prompt tokens taken from the cache for it) per image, as each is done."""
        before = self.cap.cached
        for _, rec in self.cap.records([Path(p) for p in paths]):
            yield rec, self.cap.cached - before
            before = self.cap.cached


@dataclass
class Slot:
    """A worker and what it is doing: loading (ref = its ready() call), idle, or busy (ref =
    the streaming generator of its batch)."""
    actor: Any
    ref: Any
    state: str = "loading"
    batch: list[str] = field(default_factory=list)
    got: set[str] = field(default_factory=set)
    deaths: int = 0


def _plan(ray: Any, workers: int | None, gpus_per_worker: float | None,
          threads: int | None) -> tuple[int, dict[str, Any], int | None]:
    """(workers, each one's Ray resources, CPU threads per worker)."""
    from pixlocal.errors import PixlocalError
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    gpus = float(res.get("GPU", 0))
    gpw = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpus else 0.0)
    if gpw > gpus:
        raise PixlocalError(f"--gpus-per-worker {gpw:g}: the Ray cluster has {gpus:g} GPU(s)")
    if workers is None:
        workers = max(1, int(gpus // gpw) if gpw else len(nodes))
    if gpw:
        return workers, {"num_gpus": gpw, "num_cpus": 1}, threads
    # CPU workers: the machine's cores, shared by the workers on it (the fewest any has, so
    # that one per machine fits everywhere)
    least = min((int(n["Resources"].get("CPU", 1)) for n in nodes), default=1)
    per = max(1, min(least, int(res.get("CPU", 1) // workers)))
    return workers, {"num_cpus": per}, threads or per


def run_ray(address: str | None, workers: int | None, gpus_per_worker: float | None,
            model: Path, label: str, load_kw: dict[str, Any], todo: list[Path], sink: Sink,
            prompt: str, system: str | None, skipped: int, gen: dict[str, Any]) -> None:
    from pixlocal.errors import PixlocalError
    from pixlocal.host import usable_cores
    ray = import_ray(local=address is None or on_loopback(address))
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  logging_level="ERROR")
        with err.status("starting Ray …" if address is None else f"joining Ray at "
                        f"{escape(address)} …"):
            try:
                if address is None:
                    ray.init(address="local", num_cpus=usable_cores(), **kw)
                else:
                    ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
                raise PixlocalError(f"--ray {address or ''}: cannot start or join Ray "
                                    f"({' '.join(str(e).split())[:300]})") from None
    slots: list[Slot] = []
    try:
        n, resources, threads = _plan(ray, workers, gpus_per_worker, load_kw.get("threads"))
        actor = ray.remote(max_restarts=0, scheduling_strategy="SPREAD",
                           **resources)(CaptionWorker)
        kw = {**load_kw, "threads": threads}

        def spawn(deaths: int = 0) -> Slot:
            a = actor.remote(str(model), kw, prompt, system, gen)
            return Slot(a, a.ready.remote(), deaths=deaths)

        slots = [spawn() for _ in range(n)]
        err.print(f"{escape(label)} on {n} Ray worker(s) "
                  f"({', '.join(f'{k[4:]} {v:g}' for k, v in resources.items())} each) · "
                  f"{len(todo)} image(s)" + (f", {skipped} already done" if skipped else ""),
                  style="dim")
        _schedule(ray, slots, spawn, todo, sink, skipped)
    finally:
        for s in slots:
            ray.kill(s.actor, no_restart=True)
        if started:
            ray.shutdown()


def _schedule(ray: Any, slots: list[Slot], spawn: Any, todo: list[Path], sink: Sink,
              skipped: int) -> None:
    from ray.exceptions import RayError, RayTaskError

    from pixlocal.errors import PixlocalError
    queue = deque(_record_path(p) for p in todo)
    where = {_record_path(p): p for p in todo}
    tries: dict[str, int] = {}
    written: set[str] = set()
    done = failed = cached = 0
    batch = max(1, min(BATCH, len(todo) // (4 * len(slots))))
    t0, t_up = time.perf_counter(), 0.0

    def record(rec: dict[str, Any]) -> None:
        nonlocal done, failed
        path = rec["path"]
        if path in written or path not in where:
            return  # never twice (a worker that died after sending it, then retried)
        if "error" in rec:
            failed += 1
            error_line(rec["error"])
        else:
            done += 1
        sink.write(rec, where[path])
        written.add(path)
        progress.advance(task)

    def lost(s: Slot, why: str) -> None:
        """s's worker died: its unfinished images go back to the queue, a new worker in its
        place."""
        left = [p for p in s.batch if p not in s.got and p not in written]
        again = []
        for p in left:
            tries[p] = tries.get(p, 0) + 1
            if tries[p] > RETRIES:
                record({"path": p, "error": f"{p}: its Ray worker died {tries[p]} times while "
                        "captioning it; not tried again"})
            else:
                again.append(p)
        queue.extendleft(reversed(again))
        err.print(f"[yellow]a Ray worker died[/yellow] ({escape(why)}); "
                  f"{len(again)} unfinished image(s) go to another worker", soft_wrap=True)
        slots[slots.index(s)] = spawn(s.deaths)

    try:
        with progress_bar() as progress:
            if sink.out is None and sink.fmt != "txt" and _same_terminal():
                sink.console = progress.console  # records print above the bar, not into it
            task = progress.add_task("starting workers", total=len(todo))
            while len(written) < len(todo):
                for s in slots:
                    if s.state == "idle" and queue:
                        s.batch = [queue.popleft() for _ in range(min(batch, len(queue)))]
                        s.got, s.state = set(), "busy"
                        s.ref = s.actor.caption.options(num_returns="streaming").remote(s.batch)
                busy = [s for s in slots if s.state != "idle"]
                if not busy:
                    raise AssertionError("no image left to give and none recorded")  # a bug
                ready, _ = ray.wait([s.ref for s in busy], num_returns=1, timeout=1.0)
                for ref in ready:
                    s = next(s for s in busy if s.ref is ref)
                    if s.state == "loading":
                        try:
                            failure, node, _load_s = ray.get(ref)
                        except RayError as e:  # died while loading (e.g. out of memory)
                            if s.deaths >= LOAD_DEATHS:
                                raise PixlocalError("Ray workers keep dying while loading the "
                                                    f"model: {_first_line(e)}") from None
                            err.print(f"[yellow]a Ray worker died while loading[/yellow] "
                                      f"({escape(_first_line(e))}); starting another",
                                      soft_wrap=True)
                            slots[slots.index(s)] = spawn(s.deaths + 1)
                            continue
                        if failure:
                            raise PixlocalError(f"a Ray worker on {node} cannot load the "
                                                f"model: {failure}")
                        s.state = "idle"
                        t_up = t_up or time.perf_counter()  # captioning starts
                        up = sum(x.state != "loading" for x in slots)
                        progress.update(task, description=f"captioning on {up} worker(s)")
                        continue
                    try:
                        rec, reused = ray.get(next(ref))
                    except StopIteration:
                        s.state = "idle"
                        continue
                    except RayTaskError as e:  # the captioning code raised: a bug, shown
                        raise e.as_instanceof_cause() from None
                    except RayError as e:
                        lost(s, _first_line(e))
                        continue
                    s.got.add(rec["path"])
                    cached += reused
                    record(rec)
    except KeyboardInterrupt:
        err.print(f"[yellow]interrupted[/yellow] after {done} captioned, {failed} failed; "
                  "what is recorded is kept: rerun with --resume to finish")
        raise typer.Exit(130) from None
    t1 = time.perf_counter()
    up = f", after {t_up - t0:.1f} s starting the workers" if t_up else ""
    err.print(summary(done, failed, skipped, t1 - (t_up or t0), cached, up))
    if failed:
        raise typer.Exit(1)


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]
