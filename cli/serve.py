"""`pixlocal serve`: an OpenAI-compatible HTTP server (chat completions with images).

It listens at once (GET /health answers 503 while the model loads, 200 when it is ready),
loads the model on its worker thread, and serves until Ctrl-C or SIGTERM: in-flight answers
are then cancelled at their next token (a streamed one ends with an error event, a waiting
one gets 503) and it exits 0. The app is serve_app.py, the worker serve_worker.py, the
OpenAI shapes openai_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

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

INSTALL = "pip install 'starlette>=0.37' 'uvicorn>=0.29'"


def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(
        help="Address to listen on; 0.0.0.0 reaches other machines (set --api-key).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")
                    ] = 8080,
    api_key: Annotated[str | None, typer.Option(
        envvar="PIXLOCAL_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")] = None,
    allow_image_urls: Annotated[bool, typer.Option(
        "--allow-image-urls",
        help="Fetch http(s) image URLs (off: only data: URIs; the server would fetch any "
             "address a client names).")] = False,
    max_tokens: Annotated[int, typer.Option(
        min=1, help="Most tokens in one answer (a request asking more gets 400).")] = 4096,
    max_queue: Annotated[int, typer.Option(
        min=0, help="Requests waiting behind the running one; more get 503.")] = 8,
    max_images: Annotated[int, typer.Option(min=0, help="Images in one request.")] = 8,
    max_image_pixels: Annotated[int, typer.Option(
        min=1, help="Pixels of one image, decoded (larger: 413).")] = 25_000_000,
    max_body: Annotated[float, typer.Option(
        min=0.001, help="Request body size, MiB (larger: 413).")] = 32.0,
    max_image_size: MaxImageOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    gpu_layers: GpuLayersOpt = "auto",
    max_vram: MaxVramOpt = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    threads: ThreadsOpt = None,
) -> None:
    """Serve the model over HTTP with OpenAI's API: POST /v1/chat/completions (text and
    image_url parts, stream), GET /v1/models, GET /health."""
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        error_line(f"pixlocal serve needs {e.name}, one of pixlocal's dependencies: {INSTALL}")
        raise typer.Exit(1) from None
    from . import openai_api as api
    from .registry import resolve
    from .serve_app import Server, build_app
    from .serve_worker import Worker

    with user_errors():
        r = resolve(model)  # a bad --model fails here, before anything listens
        sock = listen(host, port)
    ids = model_ids(r)
    failed: list[BaseException] = []

    def load() -> Any:
        m, load_s, label = load_model(model, device=device, dtype=dtype,
                                      max_image_size=max_image_size, gpu_layers=gpu_layers,
                                      max_vram=max_vram, context=context, threads=threads)
        err.print(f"ready: {escape(label)} loaded in {load_s:.1f} s; context "
                  f"{m.context_limit} tokens", highlight=False)
        return m

    server: Any = None

    def on_failure(e: BaseException) -> None:  # the load failed: one line, exit 1
        failed.append(e)
        server.stop_soon()

    worker = Worker(load, max_queue, on_failure)
    limits = api.Limits(max_tokens=max_tokens, max_images=max_images,
                        max_image_pixels=max_image_pixels, allow_urls=allow_image_urls)
    srv = Server(worker, ids, limits, api_key, max_body=int(max_body * 2**20))
    config = uvicorn.Config(build_app(srv), lifespan="off", log_level="info",
                            timeout_graceful_shutdown=10, server_header=False)
    server = graceful_server(config, worker.stop)
    bound = sock.getsockname()
    url = f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}"
    err.print(f"pixlocal serve: listening on {url} (model {escape(ids[0])}; OpenAI API at "
              f"{url}/v1)", highlight=False)
    if api_key is None and not is_loopback(host):
        err.print(f"[yellow]warning:[/yellow] {escape(host)} is reachable from other machines "
                  "and no --api-key is set: anyone who can reach it can use the model")
    worker.start()
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        worker.stop()
        worker.join(timeout=5)
        srv.prep.shutdown(wait=False, cancel_futures=True)
    if failed:
        with user_errors():
            raise failed[0]
        raise typer.Exit(1)  # not a user error: a bug; the worker logged it


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (OSError, one line, when it cannot be had)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise OSError(e.errno, f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def model_ids(r: Any) -> list[str]:
    """The names a request's `model` may use: name:variant, name, aliases (a directory: as
    given, and its folder name)."""
    names = [r.label]
    if r.spec is not None:
        names += [r.spec.name, *r.spec.aliases]
    else:
        names.append(r.path.name)
    return list(dict.fromkeys(n for n in names if n))


def graceful_server(config: Any, on_exit: Callable[[], None]) -> Any:
    """uvicorn's Server, stopping on SIGINT/SIGTERM with exit status 0 (uvicorn re-raises
    the signal after its shutdown) after cancelling the model's work (`on_exit`, run on the
    event loop: a signal handler must not take the worker's lock)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def __init__(self) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None

        async def serve(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().serve(sockets=sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            sigs = (signal.SIGINT, signal.SIGTERM)
            old = {s: signal.signal(s, self.handle_exit) for s in sigs}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                err.print("stopping: cancelling the work in flight", style="yellow")
            self.stop_soon()
            super().handle_exit(sig, frame)

        def stop_soon(self) -> None:
            """Cancel the model's work and stop serving (from any thread)."""
            self.should_exit = True
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop has closed already
                    self._loop.call_soon_threadsafe(on_exit)

    return GracefulServer()
