"""`adaptedit export`: an adapter as a PEFT LoRA folder."""

from __future__ import annotations

from pathlib import Path

import typer

from adaptedit import console
from adaptedit.commands.common import FORCE, JSON, QUIET, kv_table
from adaptedit.atomic import check_output
from adaptedit.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    adapter: Path = typer.Argument(..., help="Adapter folder (adaptedit)."),
    format: str = typer.Option("peft", "--format", help="Output format: peft."),
    base: str = typer.Option(None, "--base", "-b", help="base_model_name_or_path to record (default: the adapter's base)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
    force: bool = FORCE,
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Export an adapter as a PEFT LoRA folder (exact: PiSSA-family updates as rank-2r LoRA)."""
    from adaptedit.formats import load_adapter
    from adaptedit.peft_io import export_peft, peft_base_ref

    console.configure(quiet=quiet, json_mode=json_)
    if format.lower() != "peft":
        raise UsageError(f"--format {format!r}: only peft is supported")
    check_output(out, force, inputs=[adapter])
    ad = load_adapter(adapter)
    summary = export_peft(ad, out, force=force, base_ref=peft_base_ref(ad, base))
    if json_:
        console.emit_json(summary)
        return
    console.show(kv_table("adaptedit export", summary))
