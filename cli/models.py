"""`pixlocal models | pull NAME | info MODEL | rm MODEL`: the registry and the model home."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .common import err, user_errors

if TYPE_CHECKING:
    from pixlocal.config import PixtralArgs
    from pixlocal.errors import PixlocalError
    from pixlocal.registry import ModelSpec, Variant


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError(n)


def _out() -> Console:
    return Console(highlight=False, soft_wrap=True)  # stdout as it is now (CliRunner swaps it)


# ---- models ------------------------------------------------------------------------------
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """List the registry's models, their variants, and which are downloaded."""
    with user_errors():
        from pixlocal.registry import dir_size, home, is_downloaded, load_registry
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
            t.add_column(col, no_wrap=col != "PATH", overflow="fold")
        for r in rows:
            t.add_row(f"{r['name']}:{r['variant']}" + (" *" if r["default"] else ""),
                      ", ".join(r["aliases"]), r["quant"] or "original",
                      "[green]downloaded[/green]" if r["downloaded"] else "[dim]-[/dim]",
                      human(r["size"]) if r["size"] is not None else "",
                      r["path"])
        _out().print(t)
        err.print(f"[dim]* default · registry {reg.path} · home {home()} · "
                  "get one with `pixlocal pull NAME`[/dim]", soft_wrap=True)


# ---- pull --------------------------------------------------------------------------------
def _hub_error(e: BaseException, repo: str, filename: str, token: str | None) -> PixlocalError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from pixlocal.errors import ModelNotFound, PixlocalError
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


class _Bar:
    """The part of tqdm's interface huggingface_hub's downloader uses, drawn by rich on
    stderr (huggingface_hub's own bars hide themselves when stderr is not a terminal)."""
    progress: Progress | None = None
    label = ""  # the file name (huggingface_hub's desc is a truncated URL)

    def __init__(self, *, total: int | None = None, initial: int = 0, **_: Any):
        assert self.progress is not None
        self.task = self.progress.add_task(self.label, total=total, completed=initial)

    def update(self, n: int = 1) -> None:
        assert self.progress is not None
        self.progress.advance(self.task, n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_reachable(repo: str) -> None:
    """Fail at once, not after huggingface_hub's ~30 s of retries, when the hub cannot even be
    connected to (no network, DNS failure, refused). Skipped behind a proxy."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    from pixlocal.errors import PixlocalError
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                       "ALL_PROXY", "all_proxy")):
        return
    u = urlsplit(constants.ENDPOINT)
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        socket.create_connection((u.hostname or "", port), timeout=10).close()
    except OSError as e:
        why = "host not found" if isinstance(e, socket.gaierror) else (e.strerror or str(e))
        raise PixlocalError(f"cannot reach {constants.ENDPOINT} for {repo} ({why}; offline?): "
                            "rerun the pull when online; partial downloads resume") from None


def _download(repo: str, patterns: tuple[str, ...], dest: Path, token: str | None) -> None:
    import huggingface_hub
    _check_reachable(repo)
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    dest.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for pat in patterns:
        if not any(c in pat for c in "*?["):
            names.append(pat)
            continue
        # a pattern names shards listed by an index file fetched before it (no API listing)
        listed: set[str] = set()
        for idx in dest.glob("*.index.json"):
            try:
                listed |= set(json.loads(idx.read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        names += sorted(n for n in listed if fnmatch.fnmatch(n, pat))
    for i, name in enumerate(names, 1):
        err.print(f"[dim]{repo}: {name} ({i}/{len(names)})[/dim]")
        _Bar.label = name
        with Progress(TextColumn("  {task.description}"), BarColumn(), TaskProgressColumn(),
                      DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                      console=err) as _Bar.progress:
            try:
                huggingface_hub.hf_hub_download(repo, name, local_dir=dest, token=token,
                                                tqdm_class=_Bar)  # type: ignore[arg-type]
            except Exception as e:  # every hub or network failure becomes one line
                from pixlocal.errors import PixlocalError
                if isinstance(e, PixlocalError):
                    raise
                raise _hub_error(e, repo, name, token) from e


def _quant_target(spec: ModelSpec, quant: str) -> Variant:
    from pixlocal.errors import ConfigError
    for v in spec.variants.values():
        if v.quant == quant:
            return v
    raise ConfigError(f"{spec.name}: models.toml lists no {quant} variant")


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
    if source not in ("mistral", "hf"):
        raise typer.BadParameter(f"{source!r} is not mistral or hf", param_hint="--source")
    if quant is not None and quant not in ("int4", "int8", "none"):
        raise typer.BadParameter(f"{quant!r} is not int4, int8 or none", param_hint="--quant")
    with user_errors():
        from pixlocal.errors import ConfigError, ModelNotFound, PixlocalError
        from pixlocal.registry import dir_size, is_downloaded, load_registry
        reg = load_registry()
        spec = reg.find(name)
        if spec is None:
            raise ModelNotFound(f"unknown model {name!r}: not a name or alias in {reg.path} "
                                f"(known: {', '.join(sorted(reg.models)) or 'none'})")
        want = quant or spec.variant().quant or "none"
        repo, files = ((spec.upstream, spec.files) if source == "mistral"
                       else (spec.hf_upstream, spec.hf_files))
        if not repo or not files:
            raise ConfigError(f"{reg.path}: {spec.name} has no "
                              f"{'upstream' if source == 'mistral' else 'hf_upstream'} files")
        src = spec.source_variant.path
        _download(repo, files, src, token or os.environ.get("HF_TOKEN") or None)
        if not is_downloaded(src):
            raise PixlocalError(f"{src}: the download finished but holds no loadable model "
                                f"(check `files` in {reg.path})")
        err.print(f"[green]downloaded[/green] {repo} → {src} ({human(dir_size(src))})")
        out = src
        if want != "none":
            target = _quant_target(spec, want)
            try:
                from pixlocal.quant import quantize_checkpoint
            except ImportError as e:
                raise PixlocalError(f"cannot quantize: the quantizer is unavailable ({e})"
                                    ) from None
            if is_downloaded(target.path):
                err.print(f"[dim]{target.path} is already there; `pixlocal rm "
                          f"{spec.name}:{target.name}` to redo it[/dim]")
            else:
                from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn
                with Progress(f"quantizing to {want}", BarColumn(), DownloadColumn(),
                              TimeRemainingColumn(), console=err) as bar:
                    task = bar.add_task("quantize", total=None)
                    quantize_checkpoint(src, target.path, bits=int(want[3:]),
                                        progress=lambda done, total: bar.update(
                                            task, completed=done, total=total))
                err.print(f"[green]quantized[/green] {target.path} "
                          f"({human(dir_size(target.path))})")
            out = target.path
        sys.stdout.write(f"{out}\n")


# ---- info --------------------------------------------------------------------------------
def param_counts(args: PixtralArgs) -> dict[str, int]:
    import torch

    from pixlocal.model import PixtralModel
    with torch.device("meta"):
        model = PixtralModel(args)
    counts = {"decoder": 0, "vision": 0}
    for n, p in model.named_parameters():
        counts["vision" if n.startswith("vision_") else "decoder"] += p.numel()
    return counts


def kv_bytes_per_token(args: PixtralArgs, elem: int = 2) -> int:
    return 2 * args.n_layers * args.n_kv_heads * args.head_dim * elem


def _info(path: Path, context: int) -> dict[str, Any]:
    from pixlocal.config import read_args
    from pixlocal.registry import dir_size, quant_of
    args = read_args(path)
    counts = param_counts(args)
    quant = quant_of(path)
    weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    # unquantized weights load as bfloat16 (2 bytes each); quantized ones as stored
    mem_weights = weights if quant else 2 * sum(counts.values())
    kv = kv_bytes_per_token(args) * context
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
        "memory": {"context": context, "weights_bytes": mem_weights, "kv_cache_bytes": kv,
                   "kv_bytes_per_token": kv_bytes_per_token(args),
                   "total_bytes": mem_weights + kv},
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
        from pixlocal.registry import resolve
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
        from pixlocal.registry import dir_size, load_registry
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
                    ans = err.input(f"remove {spec.name}:{v.name} at {v.path} ({size})? [y/N] ")
                except EOFError:
                    ans = ""
                if ans.strip().lower() not in ("y", "yes"):
                    err.print("kept")
                    continue
            shutil.rmtree(v.path)
            err.print(f"removed {spec.name}:{v.name} ({size} freed)")
