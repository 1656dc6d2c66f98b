"""`adaptedit extract`: a LoRA adapter out of the difference of two checkpoints."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from adaptedit import console
from adaptedit.commands.common import FORCE, JSON, QUIET, TARGETS, TRUST
from adaptedit.atomic import check_output
from adaptedit.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("extract")(extract)


def extract(
    base: str = typer.Option(..., "--base", "-b", help="The model before fine-tuning."),
    tuned: str = typer.Option(..., "--tuned", help="The fine-tuned model (same architecture)."),
    rank: int = typer.Option(None, "--rank", "-r", help="Fixed rank per module."),
    energy: float = typer.Option(None, "--energy", help="Smallest rank per module holding this fraction of ‖ΔW‖² (e.g. 0.9)."),
    targets: str = TARGETS,
    seed: int = typer.Option(0, "--seed", help="Seed of the randomized SVD."),
    out: Path = typer.Option(..., "--out", "-o", help="Adapter folder to write."),
    force: bool = FORCE,
    json_: bool = JSON,
    quiet: bool = QUIET,
    trust_remote_code: bool = TRUST,
):
    """Extract a LoRA adapter of BASE from the difference TUNED − BASE (truncated SVD)."""
    from adaptedit.adapter import save_adapter
    from adaptedit.extract import extract as do_extract
    from adaptedit.models import model_inputs, resolve

    console.configure(quiet=quiet, json_mode=json_)
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank R or --energy E")
    check_output(out, force, inputs=[base, tuned])
    src_base = resolve(base, trust_remote_code=trust_remote_code)
    src_tuned = resolve(tuned, trust_remote_code=trust_remote_code)
    check_output(out, force, inputs=model_inputs(src_base) + model_inputs(src_tuned))
    start = time.perf_counter()
    with console.progress() as bar:
        adapter, reports, changed = do_extract(src_base, src_tuned, rank=rank, energy=energy,
                                               targets=targets, seed=seed, progress=bar)
    save_adapter(adapter, out, force=force)
    seconds = time.perf_counter() - start
    if changed:
        console.warn(f"{len(changed)} untargeted tensors differ between the checkpoints and are not "
                     f"in the adapter (e.g. {changed[0]})")
    if json_:
        console.emit_json({"out": str(out), "base": src_base.ref, "tuned": src_tuned.ref,
                           "seconds": round(seconds, 3), "untargeted_changed": changed,
                           "modules": [asdict(r) for r in reports]})
        return
    table = Table(title=f"adaptedit extract → {out}")
    for col in ("module", "shape", "rank", "‖ΔW‖_F", "rel. error", "energy"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for r in reports:
        table.add_row(r.name, f"{r.shape[0]}×{r.shape[1]}", str(r.rank), f"{r.delta_norm:.4g}",
                      f"{r.rel_error:.2e}", f"{r.energy:.4f}")
    console.show(table)
