"""`adaptedit inspect`: the geometry of an update, per module, per layer, for the whole model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import typer
from rich.table import Table

from adaptedit import console
from adaptedit.commands.common import JSON, QUIET, TARGETS, TRUST
from adaptedit.errors import UsageError


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)


# (column title, record key, format)
COLUMNS = [
    ("module", "name", None), ("k", "k", "d"), ("‖ΔW‖", "fro", ".3g"), ("rel", "rel", ".3g"),
    ("σ₁", "spectral", ".3g"), ("ΔM", "delta_m", ".3g"), ("ΔD", "delta_d", ".3g"),
    ("E_top out/in", ("e_top_out", "e_top_in"), ".2f"),
    ("E_bot out/in", ("e_bottom_out", "e_bottom_in"), ".2f"),
    ("φ", "phi", ".2f"), ("θ min°", "angle_min", ".0f"), ("ampl", "amplification", ".3g"),
    ("eff rank", "effective_rank", ".1f"), ("stable", "stable_rank", ".2f"),
    ("r90/r99", ("energy_rank_90", "energy_rank_99"), "d"), ("intr", "intruders", "d"),
]
SUMMARY = [("‖ΔW‖", "fro", ".3g"), ("rel", "rel", ".2g"), ("ΔM", "delta_m", ".2g"),
           ("ΔD", "delta_d", ".2g"), ("E_top", "e_top", ".2f"), ("E_bot", "e_bottom", ".2f"),
           ("eff rank", "effective_rank", ".1f"), ("intr", "intruders", "d")]


AGGREGATED = ("fro", "rel", "spectral", "delta_m", "delta_d", "e_top", "e_bottom", "e_top_out",
              "e_top_in", "e_bottom_out", "e_bottom_in", "phi", "amplification",
              "effective_rank", "stable_rank", "intruders")


def _fmt(v, f) -> str:
    if v is None:
        return "–"
    if f is None:
        return str(v)
    if f == "d":
        return str(int(v))
    if f.endswith("g") and 0 < abs(v) < 1e-2:  # 9.8e-4 rather than 0.00098: shorter cells
        f = f".{max(int(f[1:-1] or 1) - 1, 0)}e"
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m[1].replace("+", "") + m[2], format(v, f))


def _cell(rec: dict, key, f) -> str:
    if isinstance(key, tuple):
        return "/".join(_fmt(rec.get(k), f) for k in key)
    return _fmt(rec.get(key), f)


NARROW = ("module", "‖ΔW‖", "rel", "ΔM", "ΔD", "E_top out/in", "E_bot out/in", "eff rank", "intr")
SMALL = [("module", "name", None), ("‖ΔW‖", "fro", ".2g"), ("rel", "rel", ".2g"),
         ("ΔM", "delta_m", ".2g"), ("ΔD", "delta_d", ".2g"), ("E_top", "e_top", ".2f"),
         ("E_bot", "e_bottom", ".2f"), ("intr", "intruders", "d")]


def _short(name: str) -> str:
    """model.layers.3.self_attn.q_proj → 3.self_attn.q_proj (the table's first column)."""
    m = re.search(r"(?:^|\.)(\d+\.)", name)
    return name[m.start(1):] if m else name


def module_table(rows: list[dict], title: str, width: int | None = None) -> Table:
    """All columns on a wide terminal (≥ 170), fewer on narrower ones (JSON and HTML have all)."""
    width = width or console.out.width
    cols = (COLUMNS if width >= 170 else [c for c in COLUMNS if c[0] in NARROW] if width >= 120
            else SMALL)
    table = Table(title=title)
    for col, _, f in cols:
        table.add_column(col, justify="left" if f is None else "right", no_wrap=f is None)
    for r in rows:
        cells = [_short(r["name"]) if key == "name" else _cell(r, key, f) for _, key, f in cols]
        table.add_row(*cells, style="dim" if r["zero"] else None)
    return table


def summary_table(report: dict, metric: str = "rel") -> Table:
    """Layer × module type of one metric, with the per-layer, per-type and model aggregates."""
    modules = report["modules"]
    types = list(dict.fromkeys(r["type"] for r in modules))
    layers = sorted({r["layer"] for r in modules if r["layer"] is not None})
    cell = {(r["layer"], r["type"]): r for r in modules}
    f = ".2f" if metric.startswith("e_") else "d" if metric == "intruders" else ".3g"
    values = [abs(v) for v in (r.get(metric) for r in modules)
              if isinstance(v, (int, float)) and v and math.isfinite(v)]
    scale, unit = 1.0, ""
    if f == ".3g" and values and not 0.1 <= max(values) < 1000:
        # one exponent for the whole table keeps the cells short enough for an 80-column terminal
        exp = math.floor(math.log10(max(values)))
        scale, unit, f = 10.0 ** -exp, f" (×1e{exp})", ".2f"
    table = Table(title=f"layer × module type: {metric}{unit}")
    table.add_column("layer", justify="right")
    for t in types:
        table.add_column(t.removesuffix("_proj"), justify="right")
    table.add_column("all", justify="right", style="bold")
    for layer in layers:
        row = [str(layer)]
        for t in types:
            r = cell.get((layer, t))
            row.append("" if r is None else _fmt(_scaled(r.get(metric), scale), f))
        row.append(_fmt(_scaled(report["by_layer"].get(str(layer), {}).get(metric), scale), f))
        table.add_row(*row)
    row = ["all"]
    for t in types:
        agg = report["by_type"][t]
        row.append(_fmt(_scaled(agg.get(metric), scale), f))
    row.append(_fmt(_scaled(report["model"].get(metric), scale), f))
    table.add_row(*row, style="bold")
    return table


def _scaled(v, scale: float):
    return v * scale if isinstance(v, (int, float)) and scale != 1.0 else v


def type_table(report: dict, width: int | None = None) -> Table:
    width = width or console.out.width
    summary = SUMMARY if width >= 120 else [c for c in SUMMARY if c[1] not in ("fro", "effective_rank")]
    table = Table(title="per module type and whole model")
    table.add_column("group", no_wrap=True)
    table.add_column("n", justify="right")
    for col, _, _ in summary:
        table.add_column(col, justify="right")
    table.add_column("corr ΔD,ΔM", justify="right")
    corr = report["md"]["correlation"]
    for t, agg in report["by_type"].items():
        table.add_row(t, str(agg["modules"]), *[_fmt(agg.get(k), f) for _, k, f in summary],
                      _fmt(corr["by_type"].get(t), "+.2f"))
    m = report["model"]
    table.add_row("model", str(m["modules"]), *[_fmt(m.get(k), f) for _, k, f in summary],
                  _fmt(corr["mean"] if corr["mean"] is not None else corr.get("pooled"), "+.2f"),
                  style="bold")
    return table


def inspect(
    adapters: list[Path] = typer.Argument(None, help="Adapter folder(s): adaptedit or PEFT. Several: compare their (ΔD, ΔM)."),
    base: str = typer.Option(None, "--base", "-b", help="Base model (default: the one the adapter records)."),
    tuned: str = typer.Option(None, "--tuned", help="A second checkpoint: analyse ΔW = tuned − base (no adapter)."),
    trajectory: bool = typer.Option(False, "--trajectory", help="Follow the checkpoints saved during training."),
    targets: str = TARGETS,
    k: int = typer.Option(None, "--k", help="Subspace size k (default: the adapter's rank; 16 for two checkpoints)."),
    intruder_k: int = typer.Option(10, "--intruder-k", help="Top singular vectors of W₁ tested as intruders."),
    intruder_eps: float = typer.Option(0.5, "--intruder-eps", help="Intruder threshold on the best |cos| with W₀'s vectors."),
    svd: str = typer.Option("auto", "--svd", help="W₀'s SVD: auto (exact up to 2048), full or randomized."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomized SVD."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write the SVD cache."),
    sort: str = typer.Option(None, "--sort", help="Sort modules by a metric (descending): fro, rel, e_top, delta_d, intruders ..."),
    top: int = typer.Option(None, "--top", help="Show only the first N modules (by --sort, else by ‖ΔW‖)."),
    plot: Path = typer.Option(None, "--plot", help="Write PNG plots to this folder (needs matplotlib)."),
    html: Path = typer.Option(None, "--html", help="Write one self-contained HTML report."),
    force: bool = typer.Option(False, "--force", help="Replace existing --html / --plot files."),
    json_: bool = JSON,
    quiet: bool = QUIET,
    trust_remote_code: bool = TRUST,
):
    """What the update did: size, magnitude vs direction, subspaces, rank, intruder dimensions."""
    from adaptedit import aggregate, analysis

    console.configure(quiet=quiet, json_mode=json_)
    adapters = adapters or []
    if tuned is not None and adapters:
        raise UsageError("give either ADAPTER_DIR or --tuned (with --base), not both")
    if tuned is None and not adapters:
        raise UsageError("give an ADAPTER_DIR, or --base MODEL --tuned MODEL")
    if tuned is not None and trajectory:
        raise UsageError("--trajectory follows an adapter's checkpoints; it needs ADAPTER_DIR")
    if top is not None and top <= 0:
        raise UsageError(f"--top {top}: must be a positive integer")
    if sort and sort not in aggregate.NUMERIC:
        raise UsageError(f"--sort {sort!r}: choose one of {', '.join(aggregate.NUMERIC)}")
    if plot is not None or html is not None:
        from adaptedit.report import require_matplotlib

        require_matplotlib()
    _check_outputs(plot, html, [*adapters, base, tuned], force)
    opts = analysis.Options(targets=targets, k=k, intruder_k=intruder_k, intruder_eps=intruder_eps,
                     svd=svd, seed=seed, cache=not no_cache)
    with console.progress(transient=True) as bar:
        if tuned is not None:
            report = analysis.inspect_checkpoints(base, tuned, opts=opts, progress=bar,
                                           trust_remote_code=trust_remote_code)
        else:
            report = analysis.inspect_adapters(adapters, base=base, opts=opts, trajectory=trajectory,
                                        progress=bar, trust_remote_code=trust_remote_code)
    written = []
    _check_outputs(plot, html, [*adapters, base, tuned, (report.get("base") or {}).get("path")],
                   force)
    if plot is not None:
        from adaptedit.report import write_plots

        written += [str(p) for p in write_plots(report, plot, force=force)]
    if html is not None:
        from adaptedit.report import write_html

        write_html(report, html, force=force)
        written.append(str(html))
    if json_:
        report["written"] = written
        console.emit_json(report)
        return
    what = (f"{report['tuned']['ref']} − {report['base']['ref']}" if report["tuned"]
            else f"{report['adapter']['path']} on {report['base']['ref']}")
    rows = aggregate.sort_modules(report["modules"], sort, top)
    shown = f" (top {len(rows)} by {sort or 'fro'})" if top else ""
    console.show(module_table(rows, f"inspect {what}{shown}"))
    if any(r["layer"] is not None for r in report["modules"]):
        metric = sort if sort in AGGREGATED else "rel"
        console.show(summary_table(report, metric))
    console.show(type_table(report))
    extras = [r for r in report["modules"] if r["method"]]
    if extras:
        console.show(_method_line(report, extras))
    for n in report["notes"]:
        console.note(n)
    for p in written:
        console.note(f"wrote {p}")
    console.show(f"[bold]verdict:[/] {report['verdict']}")


def _check_outputs(plot, html, inputs, force: bool) -> None:
    """--plot/--html: never an input (or inside or around one), never an existing file without
    --force; checked before the work and again once the base is known."""
    from adaptedit.atomic import check_output

    if html is not None:
        check_output(html, force, inputs=inputs, option="--html")
    if plot is not None:
        from adaptedit.report import check_plot_dir

        check_output(plot, True, inputs=inputs, option="--plot")
        check_plot_dir(plot, force)


def _method_line(report: dict, rows: list[dict]) -> str:
    parts = []
    fr = [r["method"]["delora_fraction"] for r in rows if r["method"].get("delora_fraction") is not None]
    if fr:
        parts.append(f"DeLoRA: ‖ΔW‖_F / bound (λ+λ₀)·max‖W[:,j]‖ = {sum(fr) / len(fr):.3f} mean, "
                     f"{max(fr):.3f} max")
    dm = [r["method"]["dora_magnitude_rel"] for r in rows
          if r["method"].get("dora_magnitude_rel") is not None]
    if dm:
        parts.append(f"DoRA: ‖m − m₀‖/‖m₀‖ = {sum(dm) / len(dm):.3g} mean, {max(dm):.3g} max")
    rot = [r["method"] for r in rows if r["method"].get("r_minus_i") is not None]
    if rot:
        parts.append(f"rotation: ‖R − I‖_F = {sum(m['r_minus_i'] for m in rot) / len(rot):.3g} "
                     f"mean, largest angle {max(m['angle_max_deg'] for m in rot):.3g}°")
    return "; ".join(parts)
