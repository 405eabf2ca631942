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
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

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
    load_model,
    stats_line,
    user_errors,
)

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral
    from pixlocal.session import ChatSession

PROMPT = ">>> "
HELP = """commands:
  /image PATH...  attach images to your next message (paths, URLs or data URIs)
  /reset, /clear  forget the conversation (and the pending images)
  /save FILE      write the conversation as JSON
  /load FILE      continue a conversation /save wrote
  /set KEY VALUE  change max_tokens, temperature, top_p, top_k or seed
  /stats          images encoded, context used
  /help, /?       this text
  /quit, /bye     leave (or Ctrl-D); Ctrl-C stops an answer"""


def saved_chat(session: ChatSession, label: str | None = None) -> dict[str, Any]:
    """The conversation as /save writes it: messages (images by source, each answer with its
    stats) and totals. load_chat reads it back."""
    msgs = session._system()
    for t in session.turns:
        stats = {k: v for k, v in t.stats.items() if k != "context_tokens"}
        msgs += [{"role": "user", "content": t.user_content(sources=True)},
                 {"role": "assistant", "content": t.answer, "stats": stats}]
    return {"model": label, "messages": msgs,
            "stats": {"images_encoded": session.model.images_encoded,
                      "context_tokens": session.context_tokens,
                      "context_limit": session.model.context_limit}}


def load_chat(session: ChatSession, saved: dict[str, Any]) -> None:
    """Replace the session's conversation with one saved_chat wrote (images are opened again
    from their sources). PromptError for data of another shape; the session is unchanged."""
    from pixlocal.errors import PromptError
    from pixlocal.images import load_image
    from pixlocal.session import Turn
    try:
        msgs = list(saved["messages"])
        system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
        turns = []
        for u, a in zip(msgs[::2], msgs[1::2], strict=True):
            if (u["role"], a["role"]) != ("user", "assistant"):
                raise ValueError(f"expected a user then an assistant message, not "
                                 f"{u['role']} then {a['role']}")
            content = u["content"]
            chunks = content if isinstance(content, list) else []
            images = [(c["image"], load_image(c["image"])) for c in chunks
                      if isinstance(c, dict) and c.get("type") == "image"]
            text = content if not images else [c for c in content if c.get("type") != "image"]
            if isinstance(text, list) and len(text) == 1 and text[0].get("type") == "text":
                text = text[0]["text"]
            turns.append(Turn(text, images, a["content"], dict(a.get("stats") or {})))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PromptError(f"not a saved conversation ({type(e).__name__}: {e})") from None
    session.system, session.turns, session.pending = system, turns, []
    session.model.reset()


class Repl:
    """The REPL's commands around one ChatSession (which holds the history, the attached
    images and the runner's cache)."""

    def __init__(self, m: Pixtral, label: str, system: str | None, gen: dict[str, Any]):
        from pixlocal.session import ChatSession
        self.m, self.label, self.gen = m, label, gen
        self.session = ChatSession(m, system)

    # ---- conversation ------------------------------------------------------------------
    def ask(self, text: str) -> None:
        """One turn. A turn that fails (an error, a full context) or stops before any answer
        leaves the history and the attached images as they were."""
        s = self.session
        enc = s.encode(text)
        limit = self.m.context_limit
        room = limit - len(enc.tokens)
        if room < 1:
            err.print(f"[yellow]the conversation ({len(enc.tokens)} tokens) no longer fits the "
                      f"context window of {limit} tokens: /reset to start over[/yellow]")
            return
        turns = len(s.turns)
        steps = s.send(text, enc=enc, max_tokens=min(self.gen["max_tokens"], room),
                       **{k: v for k, v in self.gen.items() if k != "max_tokens"})
        wrote, last, interrupted = "", None, False
        try:
            with err.status("thinking …"):
                first = next(steps, None)
            for step in itertools.chain([first] if first else [], steps):
                wrote += step.text
                last = step
                sys.stdout.write(step.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            steps.close()
        if wrote and not wrote.endswith("\n"):
            sys.stdout.write("\n")
        sys.stdout.flush()
        if len(s.turns) == turns:
            # the chat template refuses an empty assistant message: no turn, images kept
            err.print("[yellow]stopped before any answer; message dropped[/yellow]"
                      if interrupted else "[yellow]empty answer; message dropped[/yellow]")
            return
        if interrupted:
            err.print("[yellow]stopped[/yellow]")
        err.print(f"[dim]{escape(stats_line(last, s.turns[-1].stats['generated_tokens']))}"
                  "[/dim]")
        if last is not None and last.finish_reason == "length" and \
                last.prompt_tokens + last.index + 1 >= limit:
            err.print(f"[yellow]the context window ({limit} tokens) is full: /reset to start "
                      "over[/yellow]")

    # ---- commands ----------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        try:
            name, *args = shlex.split(line)
        except ValueError as e:
            error_line(e)
            return True
        if name in ("/quit", "/exit", "/q", "/bye"):
            return False
        s = self.session
        if name in ("/help", "/?"):
            err.print(HELP, highlight=False, markup=False)
        elif name == "/image":
            if not args:
                error_line("/image needs a path")
            for a in args:
                s.attach(a)
                im = s.pending[-1][1]
                err.print(f"[dim]attached {escape(a)} ({im.width}×{im.height}); it goes with "
                          "your next message[/dim]")
        elif name in ("/reset", "/clear"):
            s.reset()
            err.print("[dim]conversation cleared[/dim]")
        elif name == "/save":
            self.save(args)
        elif name == "/load":
            self.load(args)
        elif name == "/set":
            self.set(args)
        elif name == "/stats":
            st = saved_chat(s, self.label)["stats"]
            attached = f" · {len(s.pending)} image(s) attached" if s.pending else ""
            err.print(f"images encoded: {st['images_encoded']} · turns: {len(s.turns)} · "
                      f"context: {st['context_tokens']}/{st['context_limit']} tokens{attached}")
        else:
            error_line(f"unknown command {name} (try /help)")
        return True

    def save(self, args: list[str]) -> None:
        if len(args) != 1:
            error_line("usage: /save FILE")
            return
        try:
            Path(args[0]).expanduser().write_text(
                json.dumps(saved_chat(self.session, self.label), indent=2) + "\n")
        except OSError as e:  # a missing directory, a directory, no permission: say so only
            error_line(f"cannot save to {args[0]}: {e.strerror or e}")
            return
        err.print(f"[dim]saved {len(self.session.turns)} turn(s) to {escape(args[0])}[/dim]")

    def load(self, args: list[str]) -> None:
        if len(args) != 1:
            error_line("usage: /load FILE")
            return
        try:
            saved = json.loads(Path(args[0]).expanduser().read_text())
        except (OSError, ValueError) as e:
            error_line(f"cannot load {args[0]}: {getattr(e, 'strerror', None) or e}")
            return
        load_chat(self.session, saved)
        err.print(f"[dim]loaded {len(self.session.turns)} turn(s) from {escape(args[0])}[/dim]")

    def set(self, args: list[str]) -> None:
        kinds = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int,
                 "seed": int}
        if len(args) != 2 or args[0] not in kinds:
            error_line(f"usage: /set KEY VALUE (KEY: {', '.join(kinds)})")
            return
        try:
            value = kinds[args[0]](args[1])
        except ValueError:
            error_line(f"{args[0]} needs a number, got {args[1]!r}")
            return
        if value < 0 or (args[0] == "max_tokens" and value < 1) or \
                (args[0] == "top_p" and value > 1):
            error_line(f"{args[0]} {args[1]} is out of range")
            return
        self.gen[args[0]] = value
        err.print(f"[dim]{args[0]} = {value}[/dim]")


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
    from pixlocal.config import home
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
        for src, im in first:
            repl.session.attach(src, im)
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        history = _setup_history() if tty else None
        err.print(f"[dim]{escape(label)} loaded in {load_s:.1f} s · /help for commands, "
                  "Ctrl-D to quit[/dim]")
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
                    error_line(e)
        finally:
            _save_history(history)
