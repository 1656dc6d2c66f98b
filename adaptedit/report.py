"""Plots and a one-page HTML report of an `inspect` result (matplotlib is optional).

    heatmap_<metric>.png   layer × module type of one metric (rel, e_top, e_bottom, delta_d)
    md_scatter.png         ΔD vs ΔM per module, coloured by module type; trajectories joined by step
    spectrum.png           singular values of ΔW against W₀'s, for the modules with the largest ΔW
    by_index_<name>.png, distribution_<name>.png
                           what the method exposes per singular index (SVFT/SSVD: ΔΣ) or per
                           channel (IA3/VeRA/RoAd gains), from its ``vectors`` (method_plots.py)

The HTML page embeds the PNGs as base64 and the tables as plain HTML: one file, nothing to fetch.
"""

from __future__ import annotations

import base64
import html as _html
import io
from pathlib import Path

from adaptedit.atomic import write_atomic_file
from adaptedit.errors import AdapteditError

HEATMAPS = (("rel", "‖ΔW‖_F / ‖W₀‖_F"), ("e_top", "E_top (energy in W₀'s top-k subspace)"),
            ("e_bottom", "E_bottom (energy in W₀'s bottom-k subspace)"),
            ("delta_d", "ΔD (mean 1 − cos per row)"))


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdapteditError("--plot and --html need matplotlib: pip install 'adaptedit[plot]'"
                             ) from None
    return plt


def _grid(report: dict, metric: str):
    mods = [r for r in report["modules"] if r["layer"] is not None]
    types = list(dict.fromkeys(r["type"] for r in mods))
    layers = sorted({r["layer"] for r in mods})
    import numpy as np

    g = np.full((len(layers), len(types)), np.nan)
    for r in mods:
        v = r.get(metric)
        if v is not None:
            g[layers.index(r["layer"]), types.index(r["type"])] = v
    return g, layers, types


def heatmap(report: dict, metric: str, title: str):
    plt = require_matplotlib()
    import numpy as np

    g, layers, types = _grid(report, metric)
    fig, ax = plt.subplots(figsize=(1.1 * len(types) + 2.5, 0.28 * len(layers) + 1.8))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    bounded = metric.startswith("e_")
    im = ax.imshow(np.ma.masked_invalid(g), aspect="auto", cmap=cmap,
                   vmin=0 if bounded else None, vmax=1 if bounded else None)
    ax.set_xticks(range(len(types)), types, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    if len(layers) * len(types) <= 80:
        for i in range(len(layers)):
            for j in range(len(types)):
                if np.isfinite(g[i, j]):
                    ax.text(j, i, f"{g[i, j]:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if not bounded or g[i, j] < 0.6 else "black")
    fig.tight_layout()
    return fig


def md_scatter(report: dict):
    plt = require_matplotlib()
    pts = [p for p in report["md"]["points"] if p["fro"] > 0]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    types = list(dict.fromkeys(p["type"] for p in pts))
    colors = plt.get_cmap("tab10")
    corr = report["md"]["correlation"]["by_type"]
    labels = list(dict.fromkeys(p["label"] for p in pts))
    for i, t in enumerate(types):
        mine = [p for p in pts if p["type"] == t]
        c = corr.get(t)
        name = f"{t} (r = {c:+.2f})" if c is not None else t
        ax.scatter([p["delta_d"] for p in mine], [p["delta_m"] for p in mine], s=14,
                   color=colors(i % 10), label=name, alpha=0.75)
        if len(labels) > 1:  # join each module's points in step order
            for mod in dict.fromkeys(p["module"] for p in mine):
                path = [p for p in mine if p["module"] == mod]
                ax.plot([p["delta_d"] for p in path], [p["delta_m"] for p in path],
                        color=colors(i % 10), alpha=0.25, lw=0.8)
    ax.set_xlabel("ΔD  (mean 1 − cos(W₁[n], W₀[n]))")
    ax.set_ylabel("ΔM  (mean |‖W₁[n]‖ − ‖W₀[n]‖|)")
    cr = report["md"]["correlation"]
    if cr["mean"] is not None:
        sub = f"corr(ΔD, ΔM) mean over types = {cr['mean']:+.2f}"
    elif cr.get("pooled") is not None:
        sub = f"corr(ΔD, ΔM) pooled over types = {cr['pooled']:+.2f}"
    else:
        sub = "too few points for a correlation"
    ax.set_title(f"magnitude vs direction (DoRA §3.2): {sub}\n"
                 "reference: full FT −0.62, DoRA −0.31, LoRA +0.83", fontsize=9)
    ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    if types:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def spectrum(report: dict, n: int = 6):
    plt = require_matplotlib()
    mods = sorted((r for r in report["modules"] if not r["zero"]), key=lambda r: -r["fro"])[:n]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = plt.get_cmap("tab10")
    for i, r in enumerate(mods):
        sb = r["spectrum_base"]
        sd = r["spectrum_delta"][:max(1, r.get("numerical_rank") or 0)]  # not the rounding tail
        short = ".".join(r["name"].split(".")[-3:])
        ax.semilogy(range(1, len(sb) + 1), sb, color=colors(i), lw=1, ls="--", alpha=0.7)
        ax.semilogy(range(1, len(sd) + 1), [max(x, 1e-30) for x in sd], color=colors(i), lw=1.6,
                    marker=".", ms=3, label=short)
    ax.set_xlabel("index k")
    ax.set_ylabel("singular value σₖ")
    ax.set_title("singular spectrum: ΔW (solid, numerical rank) vs W₀ (dashed), largest updates",
                 fontsize=9)
    if mods:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def figures(report: dict) -> dict:
    """{file name: figure} for every plot this report supports."""
    figs = {}
    if any(r["layer"] is not None for r in report["modules"]):
        for metric, title in HEATMAPS:
            if any(r.get(metric) is not None for r in report["modules"]):
                figs[f"heatmap_{metric}.png"] = heatmap(report, metric, title)
    figs["md_scatter.png"] = md_scatter(report)
    figs["spectrum.png"] = spectrum(report)
    from adaptedit import method_plots

    figs.update(method_plots.figures(report))
    return figs


PLOT_NAMES = (*(f"heatmap_{m}.png" for m, _ in HEATMAPS), "md_scatter.png", "spectrum.png")


def check_plot_dir(folder: Path, force: bool) -> None:
    """Refuse a --plot folder that is a file, or holds plots of an earlier run without --force."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdapteditError(f"--plot {folder}: is a file; give a folder")
    from adaptedit.method_plots import PATTERNS

    there = [n for n in PLOT_NAMES if (folder / n).exists() or (folder / n).is_symlink()]
    if folder.is_dir():
        there += sorted(p.name for pat in PATTERNS for p in folder.glob(pat))
    if there and not force:
        raise AdapteditError(f"--plot {folder}: {there[0]} already exists; pass --force to replace "
                             "the plots, or choose another folder")


def write_plots(report: dict, folder: Path, *, force: bool = False) -> list[Path]:
    """Write the PNGs into ``folder``; an existing plot is replaced only with ``force``."""
    plt = require_matplotlib()
    folder = Path(folder)
    check_plot_dir(folder, force)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdapteditError(f"--plot {folder}: cannot create the folder ({e.strerror})") from None
    written = []
    for name, fig in figures(report).items():
        path = folder / name
        try:
            write_atomic_file(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"),
                              force=force, option="--plot")
        finally:
            plt.close(fig)
        written.append(path)
    return written


def _png64(fig) -> str:
    plt = require_matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return _html.escape(str(v))


MODULE_COLS = ["name", "k", "fro", "rel", "spectral", "delta_m", "delta_d", "e_top_out",
               "e_top_in", "e_bottom_out", "e_bottom_in", "phi", "angle_min", "amplification",
               "effective_rank", "stable_rank", "energy_rank_90", "energy_rank_99", "intruders"]
GROUP_COLS = ["modules", "zero", "fro", "rel", "delta_m", "delta_d", "e_top", "e_bottom",
              "e_random", "phi", "amplification", "effective_rank", "intruders"]


def _table(rows: list[list], head: list[str]) -> str:
    h = "".join(f"<th>{_html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: dict) -> str:
    src = (f"{report['tuned']['ref']} − {report['base']['ref']}" if report.get("tuned")
           else f"{report['adapter']['path']} on {report['base']['ref']}")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>adaptedit inspect</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;font-size:12px;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}th{background:#f0f0f0}"
        ".verdict{font-size:1.1em;background:#f6f6e8;padding:.6em;border-left:4px solid #aa4}"
        "img{max-width:100%;margin:.5em 0}</style></head><body>",
        f"<h1>adaptedit inspect</h1><p>{_html.escape(src)} — mode {report['mode']}, "
        f"schema {report['schema']} v{report['schema_version']}, "
        f"{report['seconds']} s</p>",
        f"<p class='verdict'><b>verdict:</b> {_html.escape(report['verdict'])}</p>",
    ]
    for n in report.get("notes", []):
        parts.append(f"<p><i>{_html.escape(n)}</i></p>")
    corr = report["md"]["correlation"]
    parts.append("<h2>whole model and module types</h2>")
    rows = [["model", *[report["model"].get(c) for c in GROUP_COLS], corr["mean"]]]
    rows += [[t, *[a.get(c) for c in GROUP_COLS], corr["by_type"].get(t)]
             for t, a in report["by_type"].items()]
    parts.append(_table(rows, ["group", *GROUP_COLS, "corr(ΔD,ΔM)"]))
    for name, fig in figures(report).items():
        parts.append(f"<h3>{_html.escape(name[:-4])}</h3>"
                     f"<img alt='{name}' src='data:image/png;base64,{_png64(fig)}'>")
    if report["by_layer"]:
        parts.append("<h2>by layer</h2>")
        parts.append(_table([[l, *[a.get(c) for c in GROUP_COLS]]
                             for l, a in report["by_layer"].items()], ["layer", *GROUP_COLS]))
    parts.append("<h2>modules</h2>")
    parts.append(_table([[r.get(c) for c in MODULE_COLS] for r in report["modules"]], MODULE_COLS))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: dict, path: Path, *, force: bool = False) -> None:
    """Write the page to ``path``; an existing file is replaced only with ``force``."""
    page = render_html(report)
    write_atomic_file(Path(path), lambda tmp: tmp.write_text(page, encoding="utf-8"),
                      force=force, option="--html")
