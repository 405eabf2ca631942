"""`pixlocal chat [IMAGE...]`: a streaming REPL about pictures.

The runner keeps its KV cache between turns and prefills only what changed, so an image is
encoded once. Ctrl-C stops the current answer (the partial answer stays in the conversation);
Ctrl-D or /quit leaves. Answers go to stdout; prompts, status and speed go to stderr.
"""

from __future__ import annotations

import itertools
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from .common import err, user_errors
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
    load_model,
    stats_line,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from pixlocal.generate import Pixtral

PROMPT = ">>> "
HELP = """commands:
  /image PATH...  attach images to your next message (paths, URLs or data URIs)
  /reset          forget the conversation (and the pending images)
  /save FILE      write the conversation as JSON
  /set KEY VALUE  change max_tokens, temperature, top_p, top_k or seed
  /stats          images encoded, context used
  /help           this text
  /quit           leave (or Ctrl-D); Ctrl-C stops an answer"""


@dataclass
class Turn:
    text: str
    images: list[tuple[str, Image]]  # (source as typed, decoded image)
    answer: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


class Repl:
    def __init__(self, m: Pixtral, label: str, system: str | None, gen: dict[str, Any]):
        self.m, self.label, self.system, self.gen = m, label, system, gen
        self.turns: list[Turn] = []
        self.pending: list[tuple[str, Image]] = []
        self.used = 0  # context tokens the conversation holds after the last answer

    # ---- conversation ------------------------------------------------------------------
    def messages(self, new: Turn | None = None) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = ([{"role": "system", "content": self.system}]
                                      if self.system else [])
        for t in self.turns + ([new] if new else []):
            content = [{"type": "image", "image": im} for _, im in t.images]
            msgs.append({"role": "user", "content": content + [{"type": "text",
                                                                 "text": t.text}]})
            if t is not new:
                msgs.append({"role": "assistant", "content": t.answer})
        return msgs

    def ask(self, text: str) -> None:
        turn = Turn(text, self.pending)
        enc = self.m.encode(self.messages(turn))
        limit = self.m.args.max_seq_len
        room = limit - len(enc.tokens)
        if room < 1:
            err.print(f"[yellow]the conversation ({len(enc.tokens)} tokens) no longer fits the "
                      f"context window of {limit} tokens: /reset to start over[/yellow]")
            return
        self.pending = []
        encoded_before = self.m.images_encoded
        steps = self.m.stream_encoded(enc, max_tokens=min(self.gen["max_tokens"], room),
                                      **{k: v for k, v in self.gen.items() if k != "max_tokens"})
        parts: list[str] = []
        last, interrupted = None, False
        try:
            with err.status("thinking …"):
                first = next(steps, None)
            for step in itertools.chain([first] if first else [], steps):
                parts.append(step.text)
                last = step
                sys.stdout.write(step.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            steps.close()
        turn.answer = "".join(parts)
        if turn.answer and not turn.answer.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        if not turn.answer.strip():
            # the chat template refuses an empty assistant message: drop the turn, keep images
            self.pending = turn.images + self.pending
            err.print("[yellow]stopped before any answer; message dropped[/yellow]"
                      if interrupted else "[yellow]empty answer; message dropped[/yellow]")
            return
        turn.stats = {
            "prompt_tokens": len(enc.tokens),
            "prefilled_tokens": last.prefilled_tokens if last else 0,
            "generated_tokens": last.index + 1 if last else 0,
            "images_encoded": self.m.images_encoded - encoded_before,
            "interrupted": interrupted,
        }
        self.turns.append(turn)
        self.used = len(enc.tokens) + turn.stats["generated_tokens"]
        if interrupted:
            err.print("[yellow]stopped[/yellow]")
        err.print(f"[dim]{stats_line(last, turn.stats['generated_tokens'])}[/dim]")
        if last is not None and last.finish_reason == "length" and \
                last.prompt_tokens + last.index + 1 >= limit:
            err.print(f"[yellow]the context window ({limit} tokens) is full: /reset to start "
                      "over[/yellow]")

    # ---- commands ----------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        from pixlocal.images import load_image
        try:
            name, *args = shlex.split(line)
        except ValueError as e:
            err.print(f"[red]error:[/red] {e}")
            return True
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            err.print(HELP, highlight=False, markup=False)
        elif name == "/image":
            if not args:
                err.print("[red]error:[/red] /image needs a path")
            for a in args:
                self.pending.append((a, load_image(a)))
                im = self.pending[-1][1]
                err.print(f"[dim]attached {a} ({im.width}×{im.height}); it goes with your "
                          "next message[/dim]")
        elif name == "/reset":
            self.turns, self.pending, self.used = [], [], 0
            self.m.reset()
            err.print("[dim]conversation cleared[/dim]")
        elif name == "/save":
            if len(args) != 1:
                err.print("[red]error:[/red] usage: /save FILE")
            else:
                Path(args[0]).expanduser().write_text(json.dumps(self.saved(), indent=2) + "\n")
                err.print(f"[dim]saved {len(self.turns)} turn(s) to {args[0]}[/dim]")
        elif name == "/set":
            self.set(args)
        elif name == "/stats":
            s = self.saved()["stats"]
            err.print(f"images encoded: {s['images_encoded']} · turns: {len(self.turns)} · "
                      f"context: {s['context_tokens']}/{s['context_limit']} tokens")
        else:
            err.print(f"[red]error:[/red] unknown command {name} (try /help)")
        return True

    def set(self, args: list[str]) -> None:
        kinds = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int,
                 "seed": int}
        if len(args) != 2 or args[0] not in kinds:
            err.print(f"[red]error:[/red] usage: /set KEY VALUE (KEY: {', '.join(kinds)})")
            return
        try:
            value = kinds[args[0]](args[1])
        except ValueError:
            err.print(f"[red]error:[/red] {args[0]} needs a number, got {args[1]!r}")
            return
        if value < 0 or (args[0] == "max_tokens" and value < 1) or \
                (args[0] == "top_p" and value > 1):
            err.print(f"[red]error:[/red] {args[0]} {args[1]} is out of range")
            return
        self.gen[args[0]] = value
        err.print(f"[dim]{args[0]} = {value}[/dim]")

    def saved(self) -> dict[str, Any]:
        msgs: list[dict[str, Any]] = ([{"role": "system", "content": self.system}]
                                      if self.system else [])
        for t in self.turns:
            content = [{"type": "image", "image": src} for src, _ in t.images]
            msgs.append({"role": "user", "content": content + [{"type": "text",
                                                                 "text": t.text}]})
            msgs.append({"role": "assistant", "content": t.answer, "stats": t.stats})
        return {"model": self.label, "messages": msgs,
                "stats": {"images_encoded": self.m.images_encoded,
                          "context_tokens": self.used,
                          "context_limit": self.m.args.max_seq_len}}


def _read_line(tty: bool) -> str | None:
    try:
        if tty:
            return input(PROMPT)
        err.print(PROMPT, end="")
        return input()
    except EOFError:
        return None


def _setup_history() -> Path | None:
    try:
        import readline
    except ImportError:  # Windows without pyreadline: plain input() still works
        return None
    from pixlocal.registry import home
    path = home() / "chat_history"
    readline.set_history_length(1000)
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    return path


def _save_history(path: Path | None) -> None:
    if path is None:
        return
    import readline
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except OSError:
        pass


def chat(
    images: Annotated[list[str] | None, typer.Argument(
        help="Images to start with (paths, URLs or data URIs).", metavar="[IMAGE]...")] = None,
    model: ModelOpt = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 1024,
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
    threads: ThreadsOpt = None,
) -> None:
    """Chat about images in a streaming REPL (/help lists its commands)."""
    with user_errors():
        from pixlocal.errors import PixlocalError
        from pixlocal.images import load_image

        first = [(s, load_image(s)) for s in images or []]
        m, load_s, label = load_model(model, device=device, dtype=dtype,
                                      max_image_size=max_image_size, gpu_layers=gpu_layers,
                                      max_vram=max_vram, context=context, threads=threads)
        repl = Repl(m, label, system, dict(max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, top_k=top_k, seed=seed))
        repl.pending = first
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        history = _setup_history() if tty else None
        err.print(f"[dim]{label} loaded in {load_s:.1f} s · /help for commands, Ctrl-D to "
                  "quit[/dim]")
        try:
            while True:
                try:
                    line = _read_line(tty)
                except KeyboardInterrupt:
                    err.print("")
                    continue
                if line is None:
                    err.print("")
                    break
                line = line.strip()
                if not line:
                    continue
                try:
                    if line.startswith("/"):
                        if not repl.command(line):
                            break
                    else:
                        repl.ask(line)
                except PixlocalError as e:  # a bad image or prompt: say so, keep the session
                    err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        finally:
            _save_history(history)
