"""The server's generation worker: one thread that loads the model, then runs one request at
a time from a bounded FIFO queue through the model's own tiers (`Pixtral.stream_encoded`:
its prompt cache makes a follow-up turn cost only its new tokens).

The event loop never waits on the model: it submits a Job and reads the Job's events (each
Step, then "end" or "error") from an asyncio queue the worker feeds through
`loop.call_soon_threadsafe`. A cancelled job (its client left, a stop string matched, the
server is stopping) is dropped from the queue at once, or stopped after its next token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral, Step
    from pixlocal.prompt import Encoded

log = logging.getLogger("uvicorn.error")  # the server's log: one format with uvicorn's lines


@dataclass(frozen=True)
class Event:
    kind: str  # "step", "end" or "error"
    step: Step | None = None
    images_encoded: int = 0  # vision-encoder runs for this job so far
    error: BaseException | None = None


END = Event("end")


class Job:
    """One request's generation: encoded prompt and stream() keywords in, events out."""

    def __init__(self, enc: Encoded, sampling: dict[str, Any],
                 loop: asyncio.AbstractEventLoop) -> None:
        self.enc, self.sampling, self.loop = enc, sampling, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.why = ""  # "client", "stop" or "shutdown" once cancelled
        self.done = False  # the worker is done with it (set before its last event is sent)

    def put(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:  # the loop is closed: the server is gone, nobody listens
            pass


class Worker:
    """Loads the model on its own thread, then runs jobs in arrival order. At most
    `1 + max_queue` requests are admitted at once (running, queued, or being prepared)."""

    def __init__(self, load: Callable[[], Pixtral], max_queue: int,
                 on_failure: Callable[[BaseException], None]) -> None:
        self._load, self.max_queue, self._on_failure = load, max_queue, on_failure
        self.model: Pixtral | None = None
        self.state = "loading"  # then "ready", "failed" or "stopped"
        self.error = ""
        self._lock = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._admitted = 0
        self._running: Job | None = None
        self._seconds = 0.0  # a running mean of job time, for Retry-After
        self.finished = self.cancelled = 0  # jobs run to their end; stopped by their client
        self.tokens = 0  # generated, all jobs together
        self._thread = threading.Thread(target=self._main, name="pixlocal-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- admission: called on the event loop ----------------------------------------------
    def admit(self) -> bool:
        """Reserve room for one more request; False when the queue is full."""
        with self._lock:
            if self._admitted >= 1 + self.max_queue:
                return False
            self._admitted += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.state != "ready":
                job.why, job.done = "shutdown", True
                job.put(END)
                return
            self._queue.append(job)
            self._lock.notify()

    def cancel(self, job: Job, why: str) -> None:
        """Stop a job: dropped now if it waits, else after its next token."""
        with self._lock:
            if job.cancelled.is_set() or job.done:
                return
            job.why = why
            job.cancelled.set()
            if job in self._queue:
                self._queue.remove(job)
                job.done = True
                self.cancelled += why == "client"
                job.put(END)

    def stop(self) -> None:
        """Cancel everything and end the thread after the running job's next token."""
        with self._lock:
            jobs = list(self._queue) + ([self._running] if self._running else [])
            if self.state in ("loading", "ready"):
                self.state = "stopped"
            self._lock.notify_all()
        for job in jobs:
            self.cancel(job, "shutdown")

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def health(self) -> dict[str, Any]:
        with self._lock:
            running = self._running is not None
            return {"status": "ok" if self.state == "ready" else self.state,
                    "running": int(running), "queued": len(self._queue),
                    "admitted": self._admitted, "finished": self.finished,
                    "cancelled": self.cancelled, "tokens": self.tokens}

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean job time times the jobs ahead."""
        with self._lock:
            ahead = self._admitted
        return max(1, min(60, math.ceil(self._seconds * ahead)))

    # ---- the thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            model = self._load()
        except BaseException as e:  # noqa: BLE001 - reported (one line) by on_failure
            with self._lock:
                self.state, self.error = "failed", " ".join(str(e).split())
            self._on_failure(e)
            return
        with self._lock:
            self.model = model
            if self.state == "loading":
                self.state = "ready"
        while (job := self._next()) is not None:
            t0 = time.perf_counter()
            try:
                self._run(model, job)
            finally:
                with self._lock:
                    self._running = None
                self._seconds = 0.8 * self._seconds + 0.2 * (time.perf_counter() - t0) \
                    if self._seconds else time.perf_counter() - t0

    def _next(self) -> Job | None:
        with self._lock:
            while not self._queue and self.state == "ready":
                self._lock.wait()
            if self.state != "ready":
                return None
            self._running = self._queue.popleft()
            return self._running

    def _run(self, model: Pixtral, job: Job) -> None:
        from pixlocal.errors import PixlocalError

        before = model.images_encoded
        steps = model.stream_encoded(job.enc, **job.sampling)
        try:
            for step in steps:
                self.tokens += 1
                job.put(Event("step", step, model.images_encoded - before))
                if job.cancelled.is_set():
                    break
            last = END
        except PixlocalError as e:
            last = Event("error", error=e)
        except Exception as e:  # a bug: one line in the log, the server goes on
            log.error("generation failed: %s: %s", type(e).__name__, " ".join(str(e).split()),
                      exc_info=bool(os.environ.get("PIXLOCAL_DEBUG")))
            last = Event("error", error=e)
        finally:
            steps.close()
        with self._lock:  # done before the client can see its last event: no late cancel
            job.done = True
            self.finished += job.why != "client"
            self.cancelled += job.why == "client"
        job.put(last)
