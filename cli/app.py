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
from typer.core import TyperGroup

try:  # typer >= 0.22 parses with its own copy of click; older typers with click itself
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as cx  # type: ignore[no-redef]

from . import ask, bench, caption, chat, doctor, models, quantize
from .common import err, escape, is_broken_pipe


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


class Group(TyperGroup):
    """typer's group, with `--debug` after the command too, one-line usage errors, and a
    quiet exit when stdout's reader hangs up."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except OSError as e:
            if not is_broken_pipe(e):
                raise
            _quiet_stdout()
            raise typer.Exit(0) from None

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
app.command()(caption.caption)
app.command()(quantize.quantize)
app.command()(quantize.verify)
app.command("models")(models.models_cmd)
app.command()(models.pull)
app.command()(models.info)
app.command()(models.rm)
app.command()(bench.bench)
app.command()(doctor.doctor)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        try:
            sys.stdout.flush()
        except OSError as f:  # the last buffered answer met a closed pipe
            if not is_broken_pipe(f):
                raise
            _quiet_stdout()
            raise SystemExit(0) from None
        raise e from None


if __name__ == "__main__":
    main()
