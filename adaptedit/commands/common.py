"""Options shared by every command, so that names, help and defaults stay the same everywhere."""

from __future__ import annotations

import typer
from rich.table import Table

JSON = typer.Option(False, "--json", help="Print machine-readable JSON on stdout instead of tables.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars or notes.")
TARGETS = typer.Option("all-linear", "--targets", "-t",
                       help="all-linear, a comma list of name suffixes (q_proj,v_proj) or re:REGEX.")
FORCE = typer.Option(False, "--force", help="Replace OUT if it exists (only once the new one is complete).")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code (off by default).")
DEVICE = typer.Option("auto", "--device", help="auto (cuda when present), cpu or cuda.")


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def kv_table(title: str, rows: dict) -> Table:
    table = Table(show_header=False, title=title)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, str(v))
    return table
