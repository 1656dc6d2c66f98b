"""`adaptedit merge`, `export` and `extract`: adapters into weights, into PEFT, and out of fine-tunes."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from adaptedit import console
from adaptedit.commands.common import FORCE, JSON, QUIET, TARGETS, TRUST
from adaptedit.errors import AdapteditError, UsageError


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
    app.command("export")(export)
    app.command("extract")(extract)


def _size(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _kv_table(title: str, rows: dict) -> Table:
    table = Table(show_header=False, title=title)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(k, str(v))
    return table


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]  # NaN/Inf: validate_options refuses them
    except ValueError:
        raise UsageError(f"--weights {text!r}: expected numbers separated by commas, e.g. 0.7,0.3"
                         ) from None


def merge(
    adapters: list[Path] = typer.Argument(..., help="Adapter folder(s): adaptedit or PEFT LoRA."),
    base: str = typer.Option(None, "--base", "-b", help="Base model (default: the one the adapter records)."),
    weights: str = typer.Option(None, "--weights", "-w", help="One weight per adapter, e.g. 0.7,0.3 (default 1 each)."),
    combine: str = typer.Option("linear", "--combine", help="linear | ties | dare_linear | dare_ties (PEFT's conventions; one adapter too)."),
    density: float = typer.Option(1.0, "--density", help="Fraction kept by ties/dare, in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the dare drop pattern."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's) | bf16 | fp16 | fp32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB (shards are written tensor by tensor: memory does not depend on it)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare logits of base+adapter and the merged model (default on when it fits in memory)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model folder."),
    force: bool = FORCE,
    json_: bool = JSON,
    quiet: bool = QUIET,
    trust_remote_code: bool = TRUST,
):
    """Fold adapter(s) into the base weights: a safetensors model folder transformers loads as is."""
    from adaptedit.adapter import load_adapter
    from adaptedit.merge import MergeOptions
    from adaptedit.merge import merge as do_merge

    console.configure(quiet=quiet, json_mode=json_)
    if out.exists() and not force:
        raise AdapteditError(f"{out}: already exists; pass --force to replace it")
    opts = MergeOptions(weights=_parse_weights(weights), combine=combine, density=density,
                        seed=seed, dtype=dtype, max_shard_size=max_shard_size, verify=verify)
    loaded = [load_adapter(a) for a in adapters]
    with console.progress(bytes_mode=True) as bar:
        result = do_merge(loaded, out, base=base, opts=opts, force=force, progress=bar,
                          trust_remote_code=trust_remote_code)
    for n in result.notes:
        console.note(n)
    if json_:
        console.emit_json(asdict(result))
        return
    rows = {"base": result.base, "adapters": ", ".join(result.adapters), "combine": result.combine,
            "dtype": result.dtype, "tensors merged": result.tensors_merged,
            "tensors copied": result.tensors_copied, "shards": result.shards,
            "output size": _size(result.output_bytes), "time": f"{result.seconds:.2f} s",
            "verified": (f"max |Δlogit| {result.max_abs_logit_diff:.3g} (tolerance "
                         f"{result.tolerance:.3g})" if result.verified else "no"),
            "out": result.out}
    console.show(_kv_table("adaptedit merge", rows))


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
    from adaptedit.adapter import load_adapter
    from adaptedit.peft_io import export_peft

    console.configure(quiet=quiet, json_mode=json_)
    if format.lower() != "peft":
        raise UsageError(f"--format {format!r}: only peft is supported")
    if out.exists() and not force:
        raise AdapteditError(f"{out}: already exists; pass --force to replace it")
    ad = load_adapter(adapter)
    ref = base or ad.config.base.get("path") or ad.config.base.get("ref")
    if ad.config.base.get("kind") not in ("folder", None) and not base:
        ref = ad.config.base.get("ref")
    summary = export_peft(ad, out, force=force, base_ref=ref)
    if json_:
        console.emit_json(summary)
        return
    console.show(_kv_table("adaptedit export", summary))


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
    from adaptedit.models import resolve

    console.configure(quiet=quiet, json_mode=json_)
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank R or --energy E")
    if out.exists() and not force:
        raise AdapteditError(f"{out}: already exists; pass --force to replace it")
    src_base = resolve(base, trust_remote_code=trust_remote_code)
    src_tuned = resolve(tuned, trust_remote_code=trust_remote_code)
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
