"""`pixlocal ask IMAGE... PROMPT`: one question about images, answer streamed to stdout."""

from __future__ import annotations

import itertools
import json
import sys
from typing import Annotated, Any

import typer

from .app import app, err, user_errors
from .common import (
    DEFAULT_CONTEXT,
    ContextOpt,
    DeviceOpt,
    DtypeOpt,
    GpuLayersOpt,
    MaxImageOpt,
    MaxVramOpt,
    ModelOpt,
    load_model,
    stats_line,
    timings,
)


def read_prompt(prompt: str) -> str:
    if prompt == "-":
        return sys.stdin.read()
    return prompt


@app.command()
def ask(
    inputs: Annotated[list[str], typer.Argument(
        help="Image paths, URLs or data URIs, then the prompt ('-' reads it from stdin).",
        metavar="IMAGE... PROMPT")],
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens to generate.")] = 512,
    temperature: Annotated[float, typer.Option(
        "--temperature", "--temp", min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    max_image_size: MaxImageOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    gpu_layers: GpuLayersOpt = "auto",
    max_vram: MaxVramOpt = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Ask about images; the answer streams to stdout, status and speed go to stderr."""
    with user_errors():
        from pixlocal.errors import PromptError
        from pixlocal.images import load_image

        *sources, prompt = inputs
        prompt = read_prompt(prompt)
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        images = [load_image(s) for s in sources]  # fail on a bad image before a slow load
        content: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
        content.append({"type": "text", "text": prompt})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        if system:
            messages.insert(0, {"role": "system", "content": system})

        m, load_s, _ = load_model(model, device=device, dtype=dtype,
                                  max_image_size=max_image_size, gpu_layers=gpu_layers,
                                  max_vram=max_vram, context=context)
        enc = m.encode(messages)
        steps = m.stream_encoded(enc, max_tokens=max_tokens, temperature=temperature,
                                 top_p=top_p, top_k=top_k, seed=seed)
        text, tokens, last = [], [], None
        what = f"{len(enc.images)} image(s), " if enc.images else ""
        with err.status(f"reading {what}{len(enc.tokens)} prompt tokens …"):
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
                "timings": timings(last, load_s)}) + "\n")
        elif answer and not answer.endswith("\n"):
            sys.stdout.write("\n")
        err.print(f"[dim]{stats_line(last, len(tokens), load_s)}[/dim]")
