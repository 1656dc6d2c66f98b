"""The report of a comparison: final table, plots, report.md and a self-contained report.html.

Plots (PNG, matplotlib's Agg backend): ``loss_curves.png`` (train loss per step, mean and min–max
band over seeds, per method at its best lr, log-scaled steps), ``eval_loss.png`` (eval loss at each
evaluation point), ``final_metric.png`` (final eval loss, and test exact match when there is one,
mean with the 95% t-interval over seeds), ``geometry.png`` (E_top / E_bottom bars; ΔD–ΔM scatter
of every module of the first seed's final update, with corr(ΔD, ΔM) over checkpoints).
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from adaptedit.atomic import replace_file
from adaptedit.compare_stats import mean_std, t_quantile

PLOTS = ("loss_curves.png", "eval_loss.png", "final_metric.png", "geometry.png")
COLUMNS = ("method", "params", "best lr", "loss@10%", "loss@50%", "loss@100%", "eval loss",
           "test loss", "exact match", "E_top", "corr(ΔD,ΔM)", "s/step", "eval loss vs first")


def fmt(v, spec=".4f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return format(v, spec)


def pm(ms: dict, spec=".4f", scale=1.0) -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    sd = ms.get("std")
    return fmt(ms["mean"] * scale, spec) + ("" if sd is None else " ± " + fmt(sd * scale, spec))


def grid_loss(g: dict) -> str:
    """A grid cell: mean ± std over the seeds that finished, and how many diverged."""
    bad = len(g.get("diverged_seeds") or ())
    if not bad:
        return pm(g["final_eval_loss"])
    return f"diverged on {bad} of {len(g['seeds'])} seeds" + (
        f" (others {pm(g['final_eval_loss'])})" if g["final_eval_loss"]["n"] else "")


def diff_text(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "(reference)" if d is None else "–"
    if d.get("low") is None:
        return f"{d['mean']:+.4f} ({d['verdict']})"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {d['verdict']}"


def table_rows(summary: dict) -> list:
    """The final table as rows of strings (COLUMNS)."""
    rows = []
    for r in summary["table"]:
        em = r["exact_match"]
        rows.append([r["method"], f"{r['params']:,}" + (f" (r={r['rank']})" if r["rank"] else ""),
                     f"{r['best_lr']:g}", fmt(r["loss_10"]), fmt(r["loss_50"]),
                     fmt(r["loss_100"]), pm(r["eval_loss"]), pm(r["test_loss"]),
                     pm(em, ".1f", 100.0) + ("%" if em and em.get("mean") is not None else ""),
                     fmt(r["e_top"], ".3f"), fmt(r["corr_md"], "+.2f"),
                     fmt(r["s_per_step"], ".2f"), diff_text(r["vs_first"])])
    return rows


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ plots


def _best_runs(results: list, summary: dict) -> dict:
    out = {}
    for spec, m in summary["methods"].items():
        out[spec] = sorted((r for r in results if r["method"] == spec and r["lr"] == m["best_lr"]),
                           key=lambda r: r["seed"])
    return out


def _band(curves: list):
    """Steps and (mean, min, max) over the curves, on the steps they all have."""
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    vals = [[dict(c)[s] for c in curves] for s in steps]
    return (steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals],
            [max(v) for v in vals])


def plots(folder: Path, results: list, summary: dict) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = _best_runs(results, summary)
    colors = {spec: f"C{i % 10}" for i, spec in enumerate(best)}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(name)

    for name, key, title in (("loss_curves.png", "train_loss", "train loss"),
                             ("eval_loss.png", "eval_loss", "eval loss")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for spec, runs in best.items():
            steps, mean, lo, hi = _band([r[key] for r in runs])
            if not steps:
                continue
            lr = summary["methods"][spec]["best_lr"]
            ax.plot(steps, mean, color=colors[spec], label=f"{spec} (lr {lr:g})",
                    marker="o" if key == "eval_loss" else None, ms=3)
            ax.fill_between(steps, lo, hi, color=colors[spec], alpha=0.18, lw=0)
        if key == "train_loss":
            ax.set_xscale("log")
        ax.set_xlabel("step" + (" (log)" if key == "train_loss" else ""))
        ax.set_ylabel(title)
        ax.set_title(f"{title}: mean over seeds, band = min–max, each method at its best lr",
                     fontsize=9)
        ax.legend(fontsize=8)
        save(fig, name)

    panels = [("final_eval_loss", "final eval loss", 1.0)]
    if any((r.get("test") or {}).get("exact_match") is not None for r in results):
        panels.append(("exact_match", "test exact match (%)", 100.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 4), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        specs = list(best)
        for i, spec in enumerate(specs):
            ms = summary["methods"][spec]["metrics"][key]
            if ms["mean"] is None:
                continue
            half = (t_quantile(0.975, ms["n"] - 1) * ms["std"] / math.sqrt(ms["n"])
                    if ms["n"] > 1 else 0.0)
            ax.errorbar([i], [ms["mean"] * scale], yerr=[[half * scale], [half * scale]],
                        fmt="o", color=colors[spec], capsize=4)
            ax.scatter([i] * len(ms["values"]), [v * scale for v in ms["values"]],
                       color=colors[spec], alpha=0.35, s=12)
        ax.set_xticks(range(len(specs)), specs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{label}: mean, 95% interval, seeds", fontsize=9)
    save(fig, "final_metric.png")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    specs = list(best)
    for j, (key, off) in enumerate((("e_top", -0.2), ("e_bottom", 0.2))):
        vals = [mean_std([r["geometry"].get(key) for r in best[s]]) for s in specs]
        a1.bar([i + off for i in range(len(specs))], [v["mean"] or 0 for v in vals], width=0.4,
               yerr=[v["std"] or 0 for v in vals], label=key.replace("e_", "E_"),
               color="C0" if j == 0 else "C1", capsize=3)
    rand = [r["geometry"].get("e_random") for rs in best.values() for r in rs
            if r["geometry"].get("e_random") is not None]
    if rand:
        a1.axhline(sum(rand) / len(rand), color="gray", ls="--", lw=1, label="random update")
    a1.set_xticks(range(len(specs)), specs, rotation=30, ha="right", fontsize=8)
    a1.set_ylabel("energy share of ΔW")
    a1.set_title("subspace energy of the final update (mean ± std over seeds)", fontsize=9)
    a1.legend(fontsize=8)
    for spec in specs:
        if not best[spec]:
            continue
        pts = best[spec][0]["geometry"].get("md_points") or []
        c = mean_std([r["geometry"].get("corr_md") for r in best[spec]])["mean"]
        a2.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, alpha=0.5, color=colors[spec],
                   label=f"{spec} (corr {fmt(c, '+.2f')})")
    a2.set_xlabel("ΔD (direction change)")
    a2.set_ylabel("ΔM (magnitude change)")
    a2.set_title("ΔD–ΔM per module, final update; corr over checkpoints", fontsize=9)
    a2.legend(fontsize=7)
    save(fig, "geometry.png")
    return written


# ---------------------------------------------------------------------------------------- reports


def markdown(results: list, summary: dict, images: list) -> str:
    first = summary["first_method"]
    lines = ["# adaptedit compare", "",
             f"{len(results)} runs. Each method at its best learning rate on the eval data "
             "(mean ± std over seeds); the last column is the paired difference of the final "
             f"eval loss to {first} with its 95% interval (\"within seed noise\" when it "
             "contains 0).", "", markdown_table(COLUMNS, table_rows(summary)), "",
             *[f"**{spec}: no result**: {why} (try lower --lrs).\n" for spec, why
               in (summary.get("diverged") or {}).items()],
             "## Learning-rate grid (final eval loss, mean ± std over seeds)", "",
             markdown_table(("method", "lr", "seeds", "final eval loss"),
                            [[g["method"], f"{g['lr']:g}", len(g["seeds"]), grid_loss(g)]
                             for g in summary["grid"]]), "",
             f"## Paired differences to {first} (each at its best lr)", ""]
    rows = []
    for spec, m in summary["methods"].items():
        for k, d in (m.get("vs_first") or {}).items():
            if d.get("mean") is not None:
                rows.append([spec, k, diff_text(d)])
    lines += [markdown_table(("method", "metric", "difference [95% interval]"), rows)
              if rows else "(one method: nothing to compare)", ""]
    lines += ["## Geometry (mean ± std over seeds at the best lr)", "",
              markdown_table(("method", "E_top", "E_bottom", "effective rank", "intruders",
                              "‖ΔW‖", "corr(ΔD,ΔM)"),
                             [[s, *(pm(m["metrics"][k], ".3f") for k in
                                    ("e_top", "e_bottom", "effective_rank", "intruders",
                                     "delta_w_fro", "corr_md"))]
                              for s, m in summary["methods"].items()]), ""]
    lines += [f"![{n}]({n})" for n in images]
    return "\n".join(lines) + "\n"


def to_html(md_text: str, folder: Path, images: list) -> str:
    """A self-contained page: the markdown's tables as HTML, images embedded as base64."""
    body, table = [], []

    def flush():
        if table:
            head, *rows = [r for r in table if not set(r.replace("|", "")) <= {"-"}]
            cells = lambda r: [html.escape(c.strip()) for c in r.strip().strip("|").split("|")]
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells(head)) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in cells(r)) + "</tr>"
                                  for r in rows) + "</table>")
            table.clear()

    for line in md_text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((folder / name).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></p>')
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:"
             "collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>adaptedit compare</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_all(folder: Path, results: list, summary: dict) -> dict:
    """report.md, report.html and the PNGs in ``folder``; returns {name: path}."""
    folder = Path(folder)
    images = plots(folder, results, summary) if results else []
    md_text = markdown(results, summary, images)
    page = to_html(md_text, folder, images)
    replace_file(folder, "report.md", lambda p: p.write_text(md_text))
    replace_file(folder, "report.html", lambda p: p.write_text(page))
    names = ["results.jsonl", "summary.json", "report.md", "report.html", *images]
    return {n: str(folder / n) for n in names}
