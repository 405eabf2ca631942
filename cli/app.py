"""The `pixlocal` command: answers on stdout, everything else on stderr."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import typer
from rich.console import Console

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Run Pixtral-12B locally: ask about images, chat, caption folders.",
                  pretty_exceptions_show_locals=False)
err = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """PixlocalError -> one red line and exit 1; Ctrl-C -> exit 130. --debug shows tracebacks."""
    from pixlocal.errors import PixlocalError
    try:
        yield
    except PixlocalError as e:
        if os.environ.get("PIXLOCAL_DEBUG"):
            err.print_exception()
        err.print(f"[red]error:[/red] {e}", soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")
          ) -> None:
    if debug:
        os.environ["PIXLOCAL_DEBUG"] = "1"


def main() -> None:
    # each command module registers its commands on `app` when imported; one line per module
    from . import (
        ask,  # noqa: F401
        bench,  # noqa: F401
        caption,  # noqa: F401
        chat,  # noqa: F401
        doctor,  # noqa: F401
        models,  # noqa: F401
        quantize,  # noqa: F401
    )
    app()


if __name__ == "__main__":  # run as `python -m pixlocal.cli.app`: use the importable module's
    from pixlocal.cli.app import main as _main  # app, the one the commands register on
    sys.exit(_main())
