"""`pixlocal ask IMAGE... PROMPT`: one question about images, answer streamed to stdout."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from .app import app, err, user_errors


def read_prompt(prompt: str) -> str:
    if prompt == "-":
        return sys.stdin.read()
    return prompt


@app.command()
def ask(
    inputs: Annotated[list[str], typer.Argument(
        help="Image paths, URLs or data URIs, then the prompt ('-' reads it from stdin).",
        metavar="IMAGE... PROMPT")],
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Model directory (default: $PIXLOCAL_MODEL).")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 512,
    temperature: Annotated[float, typer.Option(
        "--temperature", "--temp", min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    max_image_size: Annotated[int | None, typer.Option(
        help="Lower the longest image side (e.g. 512) to cut prefill time.")] = None,
    dtype: Annotated[str, typer.Option(help="bfloat16 or float32.")] = "bfloat16",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Ask about images; the answer streams to stdout."""
    with user_errors():
        from pixlocal.errors import ModelNotFound
        from pixlocal.images import load_image

        *sources, prompt = inputs
        prompt = read_prompt(prompt)
        model_dir = model or os.environ.get("PIXLOCAL_MODEL")
        if not model_dir:
            raise ModelNotFound("no model given: pass --model DIR or set PIXLOCAL_MODEL")
        images = [load_image(s) for s in sources]  # fail on a bad image before a slow load
        content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": prompt})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if system:
            messages.insert(0, {"role": "system", "content": system})

        import pixlocal
        t0 = time.perf_counter()
        with err.status(f"loading {Path(model_dir).name} …"):
            m = pixlocal.load(model_dir, device=device, dtype=dtype,
                              max_image_size=max_image_size)
        load_s = time.perf_counter() - t0
        enc = m.encode(messages)
        steps = m.stream_encoded(enc, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, seed=seed)
        text, tokens, last = [], [], None
        with err.status(f"reading {len(enc.tokens)} prompt tokens …"):
            first = next(steps, None)
        for step in itertools.chain([first] if first else [], steps):
            text.append(step.text)
            tokens.append(step.token)
            last = step
            if not as_json:
                sys.stdout.write(step.text)
                sys.stdout.flush()
        answer = "".join(text)
        if as_json:
            sys.stdout.write(json.dumps({
                "text": answer, "tokens": tokens, "prompt_tokens": len(enc.tokens),
                "finish_reason": last.finish_reason if last else None,
                "timings": {"load_s": round(load_s, 3),
                            "prefill_s": round(last.prefill_s, 3) if last else 0.0,
                            "total_s": round(last.elapsed_s, 3) if last else 0.0,
                            "prompt_tps": round(last.prompt_tps, 2) if last else 0.0,
                            "gen_tps": round(last.gen_tps, 2) if last else 0.0}}) + "\n")
        elif answer and not answer.endswith("\n"):
            sys.stdout.write("\n")
        if last is not None:
            err.print(f"[dim]{len(enc.tokens)} prompt tokens in {last.prefill_s:.2f} s "
                      f"({last.prompt_tps:.1f} tok/s) · {len(tokens)} tokens at "
                      f"{last.gen_tps:.1f} tok/s · load {load_s:.1f} s[/dim]")

