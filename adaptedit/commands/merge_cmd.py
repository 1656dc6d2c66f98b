"""`adaptedit merge`: fold adapters into the base weights."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from adaptedit import console
from adaptedit.commands.common import FORCE, JSON, QUIET, human_bytes, kv_table
from adaptedit.atomic import check_output
from adaptedit.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)


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
    seed: int = typer.Option(None, "--seed", help="Seed of the dare drop pattern (default 0; dare_linear and dare_ties only)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base's) | bf16 | fp16 | fp32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB (shards are written tensor by tensor: memory does not depend on it)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare logits of base+adapter and the merged model (default on when it fits in memory)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a base that needs its own Python code: its code runs in the verification and is copied with the merged model (off by default)."),
    force: bool = FORCE,
    json_: bool = JSON,
    quiet: bool = QUIET,
):
    """Fold adapter(s) into the base weights: a safetensors model folder transformers loads as is."""
    from adaptedit.formats import load_adapter
    from adaptedit.merge import MergeOptions
    from adaptedit.merge import merge as do_merge

    console.configure(quiet=quiet, json_mode=json_)
    check_output(out, force, inputs=[*adapters, base])
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
            "output size": human_bytes(result.output_bytes), "time": f"{result.seconds:.2f} s",
            "verified": (f"max |Δlogit| {result.max_abs_logit_diff:.3g} (tolerance "
                         f"{result.tolerance:.3g})" if result.verified else "no"),
            "out": result.out}
    console.show(kv_table("adaptedit merge", rows))
