"""One console for the whole tool: tables and results on stdout, progress and notes on stderr.

With ``--json`` only the JSON document is written to stdout; with ``--quiet`` notes and progress
bars are suppressed. Commands call :func:`configure` once.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
# Piped or logged output: one message per line, never wrapped at rich's default 80 columns.
out.soft_wrap, err.soft_wrap = not out.is_terminal, not err.is_terminal
_state = {"quiet": False, "json": False}


def configure(*, quiet: bool = False, json_mode: bool = False) -> None:
    _state["quiet"] = quiet or json_mode
    _state["json"] = json_mode


def quiet() -> bool:
    return _state["quiet"]


def note(message: str) -> None:
    """A line of information on stderr (hidden by --quiet and --json)."""
    if not _state["quiet"]:
        err.print(message)


def warn(message: str) -> None:
    """A warning on stderr; shown even with --quiet."""
    err.print(f"[yellow]warning:[/] {message}")


def show(renderable) -> None:
    """A table or result on stdout (not in --json mode)."""
    if not _state["json"]:
        out.print(renderable)


def _clean(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit_json(obj) -> None:
    """Print a JSON document on stdout (NaN/Inf become null so the output is valid JSON)."""
    sys.stdout.write(json.dumps(_clean(obj), indent=2) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def status(message: str, quiet: bool | None = None):
    if quiet if quiet is not None else _state["quiet"]:
        yield
        return
    with err.status(message):
        yield


def progress(*, bytes_mode: bool = False, transient: bool = False) -> Progress:
    """A progress bar on stderr; disabled under --quiet or when stderr is not a terminal."""
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    if bytes_mode:
        from rich.progress import DownloadColumn, TransferSpeedColumn

        columns[2:3] = [DownloadColumn(), TransferSpeedColumn()]
    return Progress(*columns, console=err, transient=transient,
                    disable=_state["quiet"] or not err.is_terminal)
