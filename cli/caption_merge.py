"""`pixlocal caption merge SHARD... -o OUT --images DIR`: join the outputs of `--shard` runs
(or of any runs over parts of one image set) into one file, checked.

The full image list is the one a caption run makes from the same DIR|FILE... and --glob
(`caption.collect`): every image must have exactly one record. Missing and duplicated images
are reported one line each and, unless --allow-missing / --allow-duplicates, nothing is
written and the exit status is 1: the output exists only once it is complete. It is written
whole (a temporary file renamed into place), records in the order a single run writes them,
so a merge of shards equals a single run's output but for the `seconds` field.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .caption_core import CSV_FIELDS, collect, read_records
from .common import err, error_line, user_errors

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}


def _format(p: Path) -> str:
    """jsonl or csv, from the suffix, else from the first byte ({ or the CSV header)."""
    from pixlocal.errors import FormatError
    if p.suffix.lower() in FORMATS:
        return FORMATS[p.suffix.lower()]
    with open(p, "rb") as f:
        head = f.read(5)
    if head.startswith(b"{"):
        return "jsonl"
    if head.startswith(b"path,"):
        return "csv"
    raise FormatError(f"{p}: not a caption output (neither jsonl records nor a CSV with a "
                      "path column)")


def _render(recs: list[dict[str, Any]], fmt: str) -> str:
    buf = io.StringIO()
    if fmt == "jsonl":
        for r in recs:
            buf.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        for r in recs:
            w.writerow([r.get(k, "") for k in CSV_FIELDS])
    return buf.getvalue()


def merge(
    shards: Annotated[list[Path], typer.Argument(
        help="The caption outputs to join (jsonl or csv, all one format).",
        metavar="SHARD...")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Write the merged records here (default: stdout).")] = None,
    images: Annotated[list[Path] | None, typer.Option(
        "--images", help="The folders/files the shards captioned (as given to `caption`; "
        "repeat it for several): every image found there must have exactly one record.",
        metavar="DIR|FILE")] = None,
    glob: Annotated[str | None, typer.Option(
        help="The --glob the shards were run with.")] = None,
    allow_missing: Annotated[bool, typer.Option(
        help="Write the merge even if images have no record (and without --images).")
    ] = False,
    allow_duplicates: Annotated[bool, typer.Option(
        help="Write the merge even if an image has several records (the first is kept).")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing -o file.")] = False,
) -> None:
    """Join shard outputs into one, checking that every image has exactly one record.

    Example: pixlocal caption merge caps-*.jsonl -o captions.jsonl --images /data/pics"""
    if not images and not allow_missing:
        raise typer.BadParameter(
            "give the folders the shards captioned (--images DIR) to check that no image is "
            "missing, or pass --allow-missing", param_hint="--images")
    if output is not None and output.exists() and not overwrite:
        raise typer.BadParameter(f"{output} exists: pass --overwrite to replace it",
                                 param_hint="-o")
    with user_errors():
        from pixlocal.errors import PixlocalError
        seen: dict[tuple[int, int], Path] = {}
        fmts: dict[str, Path] = {}
        for s in shards:
            if not s.is_file():
                raise PixlocalError(f"{s}: no such file" if not s.exists() else
                                    f"{s}: not a file")
            st = s.stat()
            if (st.st_dev, st.st_ino) in seen:
                raise PixlocalError(f"{s}: given twice (also as {seen[st.st_dev, st.st_ino]})")
            seen[st.st_dev, st.st_ino] = s
            if output is not None and output.exists() and os.path.samefile(s, output):
                raise PixlocalError(f"{s}: is also the output (-o); pick another -o")
            fmts.setdefault(_format(s), s)
        if len(fmts) > 1:
            (a, pa), (b, pb) = list(fmts.items())[:2]
            raise PixlocalError(f"{pb} is {b} but {pa} is {a}: merge outputs of one format")
        fmt = next(iter(fmts))

        by_path: dict[str, list[tuple[Path, int, dict[str, Any]]]] = {}
        torn = 0
        for s in shards:
            recs, good = read_records(s, fmt)
            torn += good != s.stat().st_size
            for i, r in enumerate(recs, 1):
                by_path.setdefault(os.path.realpath(r["path"]), []).append((s, i, r))
        if torn:
            err.print(f"note: {torn} file(s) end in a torn record (a run killed mid-write); "
                      "it is left out", style="yellow")

        order: list[str] = list(by_path)
        missing: list[str] = []
        if images:
            expected = [os.path.realpath(p) for p in collect(images, glob, skip_txt=False)]
            if not expected:
                raise PixlocalError(f"no images found in {', '.join(map(str, images))}" +
                                    (f" matching {glob!r}" if glob else ""))
            known = set(expected)
            missing = [p for p in expected if p not in by_path]
            extra = [p for p in by_path if p not in known]
            for p in extra:
                err.print(f"note: {p} has a record but is not among the images "
                          f"(--images{' --glob' if glob else ''}); it is kept, at the end",
                          style="yellow", markup=False, soft_wrap=True)
            order = [p for p in expected if p in by_path] + extra
        dups = {p: v for p, v in by_path.items() if len(v) > 1}
        for p in missing:
            error_line(f"{p}: no record (missing)")
        for p, v in dups.items():
            where = ", ".join(f"{s} record {i}" for s, i, _ in v)
            error_line(f"{p}: {len(v)} records ({where})")
        if (missing and not allow_missing) or (dups and not allow_duplicates):
            what = ", ".join(x for x in (
                f"{len(missing)} image(s) missing" if missing else "",
                f"{len(dups)} recorded more than once" if dups else "") if x)
            hint = ("finish the shards (rerun each with --resume), then merge again"
                    if missing else "drop the extra outputs, or pass --allow-duplicates")
            error_line(f"merge incomplete: {what}; nothing written: {hint}")
            raise typer.Exit(1)

        recs = [by_path[p][0][2] for p in order]
        text = _render(recs, fmt)
        if output is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            output.parent.mkdir(parents=True, exist_ok=True)
            tmp = output.with_name(f".{output.name}.tmp")
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, output)  # the merge appears whole or not at all
        failed = sum("error" in r and bool(r.get("error")) for r in recs)
        err.print(f"merged {len(recs)} record(s) from {len(shards)} file(s)"
                  + (f" into {output}" if output is not None else "")
                  + (f" ({failed} of them failed images)" if failed else "")
                  + (f"; {len(missing)} missing" if missing else "")
                  + (f"; {len(dups)} duplicated, first kept" if dups else ""),
                  markup=False, soft_wrap=True)
