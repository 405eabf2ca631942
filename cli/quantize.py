"""`pixlocal quantize SRC OUT` and `pixlocal verify DIR`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .common import err, escape, user_errors
from .units import human_bytes as _human


def _choice(*allowed: int):
    def check(value: int | None) -> int | None:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value} is not one of {', '.join(map(str, allowed))}")
        return value
    return check


def _progress_bar(label: str):
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    return Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err, transient=True,
                    disable=not err.is_terminal)  # off a terminal it would leave a blank line


def quantize(
    src: Annotated[Path, typer.Argument(
        metavar="SRC", help="Model dir: Mistral (consolidated.safetensors) or Hugging Face.")],
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="New directory for the quantized model.")],
    bits: Annotated[int, typer.Option(
        help="Decoder linears: 4 (8.4 GB for Pixtral-12B) or 8 (13.9 GB).",
        callback=_choice(4, 8))] = 4,
    group_size: Annotated[int | None, typer.Option(
        help="Weights per scale: 32, 64 or 128 (default 32).",
        callback=_choice(32, 64, 128))] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="PATTERN=VALUE",
        help="Per-tensor override, repeatable: VALUE is bf16, float32, float16, keep, int4[-gN] "
             "or int8[-gN]; e.g. --set 'vision_encoder.*=bf16' --set 'layers.0.*=int8'.")] = None,
    shard_mb: Annotated[int, typer.Option(min=1, help="Largest shard, in MB.")] = 2000,
) -> None:
    """Quantize a checkpoint: decoder linears int4 (or int8), embeddings and output head int8,
    vision bf16, norms as stored. Progress on stderr; the output dir is printed on stdout."""
    with user_errors():
        from pixlocal.quant import quantize_checkpoint
        from rich.table import Table

        from pixlocal.errors import PixlocalError

        parent = out.absolute().parent
        if not (parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)):
            raise PixlocalError(f"{out}: cannot create it: {parent} is not a writable "
                                "directory")

        try:
            with _progress_bar("quantizing") as bar:
                task = bar.add_task("quantize", total=None)
                rep = quantize_checkpoint(
                    src, out, bits=bits, group_size=group_size,
                    overrides=tuple(overrides or ()), shard_bytes=shard_mb * 1_000_000,
                    progress=lambda done, total: bar.update(task, completed=done, total=total))
        except OSError as e:  # the output could not be written: name OUT, not a temp file
            if e.errno is None or not str(e.filename or "").startswith(str(out)):
                raise
            raise PixlocalError(f"{out}: cannot write the quantized model ({e.strerror})"
                                ) from None
        table = Table(title=escape(f"{rep.out}  ({rep.scheme} default)"),
                      title_justify="left")
        for col in ("kind", "tensors", "scheme", "bits/weight", "size", "rel RMS error"):
            table.add_column(col, justify="left" if col in ("kind", "scheme") else "right")
        for r in rep.by_kind():
            table.add_row(r["kind"], str(r["tensors"]), ", ".join(r["schemes"]),
                          f"{r['bits_per_weight']:.3f}", _human(r["bytes_out"]),
                          f"{r['rel_rms']:.5f}" if r["sq_err"] else "exact")
        n = sum(r["tensors"] for r in rep.by_kind())
        table.add_row("total", str(n), "", f"{rep.bits_per_weight:.3f}",
                      _human(rep.bytes_out), "")
        err.print(table)
        err.print(f"{_human(rep.bytes_in)} in → {_human(rep.bytes_out)} out in "
                  f"{rep.seconds:.1f} s ({rep.mb_per_s:.0f} MB/s of input)")
        sys.stdout.write(f"{rep.out}\n")
        sys.stdout.flush()
        from .warmup import precompile
        precompile()  # the first `ask` on it then starts at once (nothing if done before)


def verify(
    model_dir: Annotated[Path, typer.Argument(metavar="DIR", help="A quantized model dir.")],
) -> None:
    """Check a quantized model: index, shard sizes, sha256 checksums, metadata, tensor names
    and shapes. Prints OK, or one error line and exits 1."""
    with user_errors():
        from pixlocal.quant import verify_dir

        with _progress_bar("verifying") as bar:
            task = bar.add_task("verify", total=None)
            r = verify_dir(model_dir, progress=lambda done, total: bar.update(
                task, completed=done, total=total))
        sys.stdout.write(f"OK {r.path}: {r.quant}, {r.shards} shard(s), {r.tensors} tensors, "
                         f"{_human(r.bytes)}, checksums match\n")
