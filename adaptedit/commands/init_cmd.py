"""`adaptedit init`: build an adapter from the checkpoint's own decomposition."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from adaptedit import console
from adaptedit.adapter import save_adapter
from adaptedit.commands.common import DEVICE, FORCE, JSON, QUIET, TRUST, human_count
from adaptedit.atomic import check_output
from adaptedit.init import ENERGY_FLOOR, InitOptions, build, check_rank_applies, parameter_counts
from adaptedit.methods import METHODS
from adaptedit.models import model_inputs, resolve


def register(app: typer.Typer) -> None:
    app.command("init")(init)


def init(
    model: str = typer.Argument(None, help="Hub id, local folder, .gguf file or smollm2-135m (default)."),
    method: str = typer.Option("lora", "--method", "-m", help=f"One of: {', '.join(METHODS)}."),
    dora: bool = typer.Option(False, "--dora", help="Add DoRA's magnitude vector on top of the method."),
    rank: int = typer.Option(None, "--rank", "-r", help="Rank r of the update (default 16; HRA 8: reflections; OFT: blocks per module, instead of --block-size; vera 256; refused for ia3 and road, which have none)."),
    alpha: float = typer.Option(None, "--alpha", help="α (scaling s = α/r); default from the method's paper."),
    rslora: bool = typer.Option(False, "--rslora", help="Scale by α/√r instead of α/r."),
    targets: str = typer.Option(None, "--targets", "-t", help="all-linear, a comma list of name suffixes (q_proj,v_proj) or re:REGEX (default: the method's, all-linear for most; ia3: k_proj,v_proj,down_proj as PEFT)."),
    rank_pattern: str = typer.Option(None, "--rank-pattern", help="Per-module ranks, e.g. 'mlp=32,o_proj=8'."),
    svd: str = typer.Option("auto", "--svd", help="full | randomized | auto (randomized for PiSSA on large matrices)."),
    niter: int = typer.Option(4, "--niter", help="Power iterations of the randomized SVD."),
    oversample: int = typer.Option(8, "--oversample", help="Extra sketch columns of the randomized SVD."),
    energy_floor: float = typer.Option(
        ENERGY_FLOOR, "--energy-floor",
        help="Randomized SVD: least captured top-r energy of every module; modules below it are "
             "decomposed again with more power iterations (0: off, nothing measured, as PEFT)."),
    seed: int = typer.Option(0, "--seed", help="Seed for random init and randomized SVD."),
    delora_lambda: float = typer.Option(15.0, "--delora-lambda", help="DeLoRA's initial strength λ."),
    block_size: int = typer.Option(None, "--block-size", help="OFT/BOFT: size b of each rotated block (default PEFT's: OFT 32, BOFT 4; or the largest size that fits every targeted module)."),
    group_size: int = typer.Option(None, "--group-size", help="RoAd: outputs per group, paired k with k + g/2 (PEFT's group_size; default 64, or the largest even size that divides every targeted module)."),
    butterfly_factors: int = typer.Option(None, "--butterfly-factors", help="BOFT: number m of butterfly factors (PEFT's boft_n_butterfly_factor; default 2; 1 is OFT with an output scale)."),
    coft_eps: float = typer.Option(None, "--coft-eps", help="OFT: constrained variant (COFT), ‖Q‖ ≤ ε/√blocks per block."),
    hra_lambda: float = typer.Option(None, "--hra-lambda", help="HRA: weight λ of the orthogonality regulariser λ‖I − ÛᵀÛ‖² added to the training loss."),
    svft_pattern: str = typer.Option(None, "--svft-pattern", help="SVFT: the sparsity of M in ΔW = U M Vᵀ: plain (diagonal: ΔΣ only; default), banded (--svft-off-diagonals), random (--svft-random-k per row, drawn from --seed)."),
    svft_off_diagonals: int = typer.Option(None, "--svft-off-diagonals", help="SVFT banded: d diagonals on each side of M's diagonal (default 2)."),
    svft_random_k: int = typer.Option(None, "--svft-random-k", help="SVFT random: k random entries in every row of M (default 5)."),
    device: str = DEVICE,
    out: Path = typer.Option(..., "--out", "-o", help="Adapter folder to write."),
    force: bool = FORCE,
    json_: bool = JSON,
    quiet: bool = QUIET,
    trust_remote_code: bool = TRUST,
):
    """Build an adapter (LoRA, PiSSA, MiLoRA, OLoRA, DeLoRA, OFT, BOFT, HRA, IA3, VeRA, SVFT, SSVD, RoAd; +DoRA) and write it to OUT."""
    console.configure(quiet=quiet, json_mode=json_)
    opts = InitOptions(method=method, rank=rank, alpha=alpha, dora=dora, rslora=rslora,
                       targets=targets, rank_pattern=rank_pattern, svd=svd, niter=niter,
                       oversample=oversample, energy_floor=energy_floor, seed=seed, device=device,
                       delora_lambda=delora_lambda,
                       options={k: v for k, v in (("block_size", block_size), ("coft_eps", coft_eps),
                                                  ("hra_lambda", hra_lambda),
                                                  ("svft_pattern", svft_pattern),
                                                  ("svft_off_diagonals", svft_off_diagonals),
                                                  ("svft_random_k", svft_random_k),
                                                  ("butterfly_factors", butterfly_factors),
                                                  ("group_size", group_size))
                                if v is not None})
    check_rank_applies(opts)  # before the model is read
    check_output(out, force, inputs=[model])
    source = resolve(model, trust_remote_code=trust_remote_code, quiet=console.quiet())
    check_output(out, force, inputs=model_inputs(source))
    start = time.perf_counter()
    with console.progress() as bar:
        adapter = build(source, opts, progress=bar)
    seconds = time.perf_counter() - start
    n_adapter, n_base = parameter_counts(source, adapter)
    cfg = adapter.config
    scalings = sorted({m.scaling for m in cfg.modules.values()})
    header = {
        "model": source.ref, "method": cfg.method + ("+dora" if cfg.dora else ""),
        "rank": cfg.rank, "alpha": cfg.alpha, "scaling": scalings[0] if len(scalings) == 1 else scalings,
        "rslora": cfg.rslora, "modules": len(cfg.modules), "trainable_parameters": n_adapter,
        "trainable_percent": 100.0 * n_adapter / max(n_base, 1), "svd": cfg.init.get("svd"),
        "seconds": round(seconds, 3), "out": str(out),
    }
    if "captured_energy_min" in cfg.init:
        for k in ("captured_energy_min", "captured_energy_worst_module", "energy_floor"):
            header[k] = cfg.init[k]
        header["energy_refined_modules"] = len(cfg.init["energy_refined"])
    elif cfg.init.get("svd") == "randomized" and opts.energy_floor == 0:
        header["energy_floor"] = 0.0  # the guard is off: nothing measured, nothing redone
    save_adapter(adapter, out, force=force)
    if json_:
        console.emit_json(header)
        return
    table = Table(show_header=False, title="adaptedit init")
    table.add_column(style="bold")
    table.add_column()
    for k, v in header.items():
        if k == "trainable_parameters":
            v = f"{human_count(v)} ({header['trainable_percent']:.3f}% of {human_count(n_base)})"
        elif k == "trainable_percent":
            continue
        elif k == "captured_energy_min":
            v = (f"{v:.6f} (randomized vs exact top-r spectral energy, worst of all "
                 f"{len(cfg.modules)} modules: {header['captured_energy_worst_module']})")
        elif k == "captured_energy_worst_module":
            continue
        elif k == "energy_floor" and v == 0:
            v = "0 (off: the fixed sketch, its captured energy not measured)"
        elif k == "energy_refined_modules":
            v = f"{v} (below the floor with --niter {opts.niter}: decomposed again)"
        table.add_row(k, str(v))
    console.show(table)
