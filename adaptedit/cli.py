"""The `adaptedit` command line: a thin layer over the library.

Conventions for every command: results on stdout (tables, or JSON with --json), progress and notes
on stderr, --quiet; exit 0 on success, 1 on a runtime error, 2 on a usage error. Errors are one
line; set ADAPTEDIT_DEBUG=1 (or pass --debug before the command) for the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from adaptedit import __version__
from adaptedit.errors import AdapteditError, UsageError

app = typer.Typer(
    name="adaptedit",
    help="Edit transformer models with geometric adapters: init, train, inspect, merge, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"adaptedit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
):
    if debug:
        os.environ["ADAPTEDIT_DEBUG"] = "1"


def _register():
    from adaptedit.commands import COMMANDS

    for module in COMMANDS:
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and turn errors into one line + exit code."""
    _register()
    try:
        # Without standalone mode Click returns typer.Exit's code instead of exiting; commands
        # themselves return None.
        rc = app(args=argv, prog_name="adaptedit", standalone_mode=False)
    except AdapteditError as e:
        _fail(e, 2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors, and anything unexpected
        # Typer ≥ 0.26 vendors its own copy of Click, so match Click's exceptions by shape.
        if type(e).__name__ == "Abort":
            sys.stderr.write("aborted\n")
            sys.exit(1)
        if hasattr(e, "exit_code") and hasattr(e, "show"):
            e.show()
            sys.exit(e.exit_code)
        _fail(e, 1, unexpected=True)
    sys.exit(rc if isinstance(rc, int) else 0)


def _fail(e: BaseException, code: int, unexpected: bool = False) -> None:
    if os.environ.get("ADAPTEDIT_DEBUG", "0") not in ("", "0"):
        import traceback

        traceback.print_exc()
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if unexpected:
        msg = f"{type(e).__name__}: {msg} (set ADAPTEDIT_DEBUG=1 for the traceback)"
    sys.stderr.write(f"error: {msg}\n")
    sys.exit(code)
