"""The `adaptedit` command line: a thin layer over the library.

Conventions for every command: results on stdout (tables, or JSON with --json), progress and notes
on stderr, --quiet; exit 0 on success, 1 on a runtime error, 2 on a usage error. Errors are one
line; set ADAPTEDIT_DEBUG=1 (or pass --debug before the command) for the traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
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
    # SIGTERM (a scheduler, `timeout`, `kill`) unwinds like Ctrl-C: temporary folders are removed
    # and `train` saves a checkpoint. The previous handler is back when main() returns.
    old = signal.getsignal(signal.SIGTERM)
    if old is not signal.SIG_IGN:  # a parent that ignores SIGTERM for us keeps it ignored
        with contextlib.suppress(ValueError):  # not the main thread (embedded use): leave it be
            signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        sys.exit(_run(argv))
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, old)


def _run(argv: list[str] | None) -> int:
    try:
        _register()  # inside the try: Ctrl-C during the (slow) imports is one line too
        # Without standalone mode Click returns typer.Exit's code instead of exiting; commands
        # themselves return None.
        rc = app(args=argv, prog_name="adaptedit", standalone_mode=False)
    except AdapteditError as e:
        return _fail(e, 2 if isinstance(e, UsageError) else 1)
    except KeyboardInterrupt:  # Ctrl-C before Typer runs (it turns a later one into exit 130)
        rc = 130
    except Terminated:
        sys.stderr.write("terminated\n")
        return 143
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # click usage errors, and anything unexpected
        # Typer ≥ 0.26 vendors its own copy of Click, so match Click's exceptions by shape.
        if type(e).__name__ == "Abort":
            sys.stderr.write("aborted\n")
            return 1
        if hasattr(e, "exit_code") and hasattr(e, "show"):
            if type(e).__name__ == "NoArgsIsHelpError" or not hasattr(e, "format_message"):
                e.show()  # the help text itself
                return e.exit_code
            # a usage error (bad option value, unknown option or command): one line, as ours
            ctx = getattr(e, "ctx", None)
            where = getattr(ctx, "command_path", None) or "adaptedit"
            sys.stderr.write(f"error: {' '.join(e.format_message().split())} "
                             f"(see '{where} --help')\n")
            return e.exit_code
        return _fail(e, 1, unexpected=True)
    if rc == 130:
        sys.stderr.write("interrupted\n")
    return rc if isinstance(rc, int) else 0


class Terminated(BaseException):
    """SIGTERM. Not a KeyboardInterrupt (Typer would swallow it into exit 130), and not an
    Exception, so that no ``except Exception`` skips the clean-up on the way out."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _fail(e: BaseException, code: int, unexpected: bool = False) -> int:
    if os.environ.get("ADAPTEDIT_DEBUG", "0") not in ("", "0"):
        import traceback

        traceback.print_exc()
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if unexpected:
        msg = f"{type(e).__name__}: {msg} (set ADAPTEDIT_DEBUG=1 for the traceback)"
    sys.stderr.write(f"error: {msg}\n")
    return code
