"""The `pixlocal` command: answers on stdout, everything else on stderr.

Each command is a plain function in its own module; this module is the only one that knows
them all, and registers them on `app`. No command module imports this one.

Exit status: 0 done, 1 an error (one `error:` line on stderr), 2 a usage error (one `error:`
line naming the option or argument and the --help to read), 130 interrupted (Ctrl-C).
A reader that hangs up (`pixlocal models | head -1`) ends the run quietly with status 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # newer typers (0.29 here) parse with their own copy of click; older ones with click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as cx  # type: ignore[no-redef]

from . import ask, bench, caption, chat, doctor, models, quantize, serve, warmup
from .common import err, error_line, escape, is_broken_pipe


def _take_debug(args: list[str]) -> list[str]:
    """--debug anywhere before a `--` (after the command too) turns tracebacks on."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        os.environ["PIXLOCAL_DEBUG"] = "1"
        args = [a for a in args[:end] if a != "--debug"] + args[end:]
    return args


def _quiet_stdout() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so the interpreter's final
    flush cannot fail again (Python's documented way to handle SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file descriptor (a test's captured stream): nothing will flush


def _usage_line(e: cx.ClickException) -> str:
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, cx.UsageError) and ctx is not None and ctx.help_option_names:
        msg += ("" if msg.endswith(".") else ".") + \
            f" Try '{ctx.command_path} {ctx.help_option_names[0]}'."
    return msg


def _pipe_closed(e: OSError) -> None:
    """stdout's reader hung up: end quietly, status 0 (raises typer.Exit)."""
    if is_broken_pipe(e):
        _quiet_stdout()
        raise typer.Exit(0) from None


class Group(TyperGroup):
    """typer's group, with `--debug` after the command too, one-line usage errors, and a
    quiet exit when stdout's reader hangs up."""

    def make_context(self, *args: Any, **kw: Any) -> Any:  # --help, --version print here
        try:
            return super().make_context(*args, **kw)
        except OSError as e:
            _pipe_closed(e)
            raise

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            _pipe_closed(e)
            raise

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any
             ) -> Any:
        args = _take_debug(sys.argv[1:] if args is None else list(args))
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except cx.ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `pixlocal`: the help
                e.show()
                sys.exit(e.exit_code)
            err.print(f"[red]error:[/red] {escape(_usage_line(e))}", soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            err.print("[yellow]interrupted[/yellow]")
            sys.exit(130)
        except OSError as e:  # stdout on a full disk, outside any command's user_errors
            if e.errno is None:
                raise
            if os.environ.get("PIXLOCAL_DEBUG"):
                err.print_exception()
            error_line(f"{e.filename or 'stdout'}: {e.strerror or e}")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=Group, no_args_is_help=True, add_completion=False,
                  help="Run Pixtral-12B locally: ask about images, chat, caption folders.",
                  pretty_exceptions_show_locals=False)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version
        try:
            v = version("pixlocal")
        except PackageNotFoundError:
            from pixlocal import __version__ as v
        sys.stdout.write(f"pixlocal {v}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option(
        "--debug",
        help="Show tracebacks on errors (also accepted after the command).")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True,
                                          callback=_version,
                                          help="Print the version and exit.")] = False,
) -> None:
    if debug:
        os.environ["PIXLOCAL_DEBUG"] = "1"


app.command()(ask.ask)
app.command()(chat.chat)
app.command(cls=caption.CaptionCommand)(caption.caption)  # + `caption merge`
app.command()(quantize.quantize)
app.command()(quantize.verify)
app.command("models")(models.models_cmd)
app.command()(models.pull)
app.command()(models.info)
app.command()(models.rm)
app.command()(bench.bench)
app.command()(doctor.doctor)
app.command()(serve.serve)
app.command()(warmup.warmup)


def _rich_broken_pipe(self: Console) -> None:
    """rich's own handler exits 1 when a reader hangs up; the reader leaving is not an
    error (`pixlocal --help | head -1`)."""
    self.quiet = True
    _quiet_stdout()
    raise SystemExit(0)


def main() -> None:
    Console.on_broken_pipe = _rich_broken_pipe  # type: ignore[method-assign]
    code: int | str | None = 0
    try:
        app()
    except SystemExit as e:
        code = e.code
    try:
        sys.stdout.flush()  # the last of the answer, while we can still report it
    except OSError as e:
        _quiet_stdout()  # nothing more can reach the reader: the exit-time flush must not fail
        if is_broken_pipe(e):
            code = 0  # the reader hung up (`| head`): not an error
        elif code in (0, None):
            error_line(f"stdout: {e.strerror or e}")
            code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
