"""The Hugging Face hub client behind `pixlocal pull`: download a registered model's files
(resumable), then optionally make its quantized variant. Every hub or network failure becomes
one PixlocalError line; progress goes to a callback as PullEvents (the CLI draws the bars).

    path = pixlocal.cli.hub.pull("pixtral-12b", quant="int4",
                                 quantize=pixlocal.quant.quantize_checkpoint)

A caller that wants a quantized variant made passes the function that makes it, so a pull
without quantization never imports the quantizer.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pixlocal.errors import ConfigError, ModelNotFound, PixlocalError

from .registry import ModelSpec, Variant, is_downloaded, load_registry

QUANTS = ("int4", "int8", "none")
SOURCES = ("mistral", "hf")  # upstream (Mistral format) or hf_upstream (Llava format)
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
               "all_proxy")


@dataclass(frozen=True)
class PullEvent:
    """What pull is doing. what: "file" (file `index` of `count` starts), "bytes" (`done` of
    `total` bytes of that file, resumed bytes included), "downloaded" (the source files are all
    in `path`), "present" (the quantized variant `name` (NAME:VARIANT) at `path` is there
    already: not redone)."""

    what: Literal["file", "bytes", "downloaded", "present"]
    repo: str
    name: str = ""
    index: int = 0
    count: int = 0
    done: int = 0
    total: int | None = None
    path: Path | None = None


OnEvent = Callable[[PullEvent], None]
Quantizer = Callable[..., Any]  # quantize(src, out, bits=4 | 8), e.g. quant.quantize_checkpoint


def hub_error(e: BaseException, repo: str, filename: str, token: str | None) -> PixlocalError:
    """A huggingface_hub / network exception → the one line the user sees."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    site = constants.ENDPOINT
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, GatedRepoError):
        how = ("your token has no access yet" if token else
               "then pass --token or set HF_TOKEN")
        return PixlocalError(f"{repo} is gated: accept its conditions at {site}/{repo} "
                             f"while logged in ({how})")
    if isinstance(e, RepositoryNotFoundError):
        return ModelNotFound(f"{repo}: repository not found on {site} (or private: pass "
                             "--token or set HF_TOKEN)")
    if isinstance(e, HfHubHTTPError) and status == 401:
        return PixlocalError(f"{site} refused the Hugging Face token (401 unauthorised): check "
                             "--token or HF_TOKEN")
    if isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
        return ModelNotFound(f"{repo}: file {filename} not found on {site}")
    if isinstance(e, HfHubHTTPError) and status is not None:
        return PixlocalError(f"{repo}: downloading {filename} failed (HTTP {status})")
    return PixlocalError(f"cannot reach {site} for {repo}/{filename} (offline?): rerun the "
                         "pull when online; finished files are kept and partial ones resume")


def check_reachable(repo: str) -> None:
    """Fail at once, not after huggingface_hub's ~30 s of retries, when the hub cannot even be
    connected to (no network, DNS failure, refused). Skipped behind a proxy."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in _PROXY_VARS):
        return
    u = urlsplit(constants.ENDPOINT)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname or "", port), timeout=10).close()
    except OSError as e:
        why = "host not found" if isinstance(e, socket.gaierror) else (e.strerror or str(e))
        raise PixlocalError(f"cannot reach {constants.ENDPOINT} for {repo} ({why}; offline?): "
                            "rerun the pull when online; partial downloads resume") from None


def _bar_class(report: Callable[[int, int | None], None]) -> type:
    """The part of tqdm's interface huggingface_hub's downloader uses, reporting
    (bytes done, total) instead of drawing."""

    class Bar:
        def __init__(self, *, total: int | None = None, initial: int = 0, **_: Any):
            self.total, self.n = total, initial
            report(self.n, self.total)

        def update(self, n: int = 1) -> None:
            self.n += n
            report(self.n, self.total)

        def close(self) -> None:
            pass

        def __enter__(self) -> Bar:
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

    return Bar


def _expand(pattern: str, dest: Path) -> list[str]:
    """A plain file name as it is; a pattern names the shards listed by an index file already
    in `dest` (fetched before it: the hub API is not used for listing)."""
    if not any(c in pattern for c in "*?["):
        return [pattern]
    listed: set[str] = set()
    for idx in dest.glob("*.index.json"):
        try:
            listed |= set(json.loads(idx.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return sorted(n for n in listed if fnmatch.fnmatch(n, pattern))


def download(repo: str, patterns: tuple[str, ...], dest: Path, token: str | None = None,
             on_event: OnEvent | None = None) -> None:
    """Fetch `patterns` of `repo` into `dest` (resuming partial files; files already there
    are not fetched again). A pattern is expanded once the files before it are there."""
    check_reachable(repo)
    emit = on_event or (lambda ev: None)
    dest.mkdir(parents=True, exist_ok=True)
    i = 0
    for k, pat in enumerate(patterns):  # in order: an index file comes before its shards
        names = _expand(pat, dest)
        for j, name in enumerate(names):
            i += 1
            count = i + len(names) - j - 1 + sum(
                len(_expand(p, dest)) for p in patterns[k + 1:])
            _fetch(repo, name, dest, token, i, count, emit)


def _fetch(repo: str, name: str, dest: Path, token: str | None, i: int, count: int,
           emit: OnEvent) -> None:
    import huggingface_hub

    emit(PullEvent("file", repo, name, i, count))
    bar = _bar_class(lambda done, total: emit(
        PullEvent("bytes", repo, name, done=done, total=total)))
    try:
        huggingface_hub.hf_hub_download(repo, name, local_dir=dest, token=token,
                                        tqdm_class=bar)  # type: ignore[arg-type]
    except PixlocalError:
        raise
    except Exception as e:  # every hub or network failure becomes one line
        raise hub_error(e, repo, name, token) from e


def _quant_target(spec: ModelSpec, quant: str) -> Variant:
    for v in spec.variants.values():
        if v.quant == quant:
            return v
    raise ConfigError(f"{spec.name}: models.toml lists no {quant} variant")


def find_spec(name: str) -> tuple[ModelSpec, Path]:
    """A registry name or alias → (its spec, the registry file); ModelNotFound if unknown."""
    reg = load_registry()
    spec = reg.find(name)
    if spec is None:
        raise ModelNotFound(f"unknown model {name!r}: not a name or alias in {reg.path} "
                            f"(known: {', '.join(sorted(reg.models)) or 'none'})")
    return spec, reg.path


def pull(name_or_spec: str | ModelSpec, *, quant: str | None = None, token: str | None = None,
         source: str = "mistral", on_event: OnEvent | None = None,
         quantize: Quantizer | None = None) -> Path:
    """Download a registered model and return the directory of the variant asked for.

    quant: "int4", "int8" or "none" (default: the registry's default variant). token: a
    Hugging Face token (default $HF_TOKEN). source: "mistral" (upstream) or "hf" (hf_upstream).
    quantize(src, out, bits=…) makes a quantized variant that is not there yet (e.g.
    pixlocal.quant.quantize_checkpoint); without it such a pull raises PixlocalError after the
    download. Raises PixlocalError subclasses (ModelNotFound, ConfigError) with one line.
    """
    if source not in SOURCES:
        raise ConfigError(f"source {source!r} is not mistral or hf")
    if quant is not None and quant not in QUANTS:
        raise ConfigError(f"quant {quant!r} is not int4, int8 or none")
    if isinstance(name_or_spec, ModelSpec):
        spec, where = name_or_spec, "models.toml"
    else:
        spec, path = find_spec(name_or_spec)
        where = str(path)
    want = quant or spec.variant().quant or "none"
    repo, files = ((spec.upstream, spec.files) if source == "mistral"
                   else (spec.hf_upstream, spec.hf_files))
    if not repo or not files:
        raise ConfigError(f"{where}: {spec.name} has no "
                          f"{'upstream' if source == 'mistral' else 'hf_upstream'} files")
    src = spec.source_variant.path
    download(repo, files, src, token or os.environ.get("HF_TOKEN") or None, on_event)
    if not is_downloaded(src):
        raise PixlocalError(f"{src}: the download finished but holds no loadable model "
                            f"(check `files` in {where})")
    if on_event is not None:
        on_event(PullEvent("downloaded", repo, path=src))
    if want == "none":
        return src
    target = _quant_target(spec, want)
    if is_downloaded(target.path):
        if on_event is not None:
            on_event(PullEvent("present", repo, f"{spec.name}:{target.name}",
                               path=target.path))
        return target.path
    if quantize is None:
        raise PixlocalError(f"{src} is downloaded; making its {want} variant needs the "
                            "quantizer: pass quantize=pixlocal.quant.quantize_checkpoint")
    quantize(src, target.path, bits=int(want[3:]))
    return target.path
