"""Plots of what a method makes visible per index or per channel (``inspect --plot``).

A method names its vectors in ``VECTORS`` ({name: (kind, label)}) and returns them per module from
``vectors(t, info)`` (:mod:`adaptedit.methods.base`); nothing here looks at a method's name.

    by_index_<name>.png      kind "by_index": one line per module over the singular index
                             (SVFT/SSVD: ΔΣ_i — which singular directions moved), a panel per
                             module type, colour = layer, the type's mean |value| in black; with
                             more than LINES_MAX modules in a panel, the median and the 10-90%
                             band over its modules instead of one line each
    distribution_<name>.png  kind "distribution": a histogram per module type of the values of all
                             its modules (IA3's gains, VeRA's b and d, RoAd's α and |θ|)

The data come from the adapter the report was made from (``report["adapter"]["path"]``), for the
modules the report lists; :func:`method_vectors` returns exactly what is plotted.
"""

from __future__ import annotations

import math

KINDS = ("by_index", "distribution")
PATTERNS = tuple(f"{k}_*.png" for k in KINDS)
BINS = 40
LINES_MAX = 8  # modules per by_index panel drawn one line each; more: median and 10-90% band
BAND = (10, 90)


def method_vectors(report: dict) -> dict:
    """{name: {"kind", "label", "method", "modules": {module: {"type", "layer", "values"}}}} with
    values float64 numpy arrays — the adapter's own tensors as its method exposes them."""
    from adaptedit.formats import load_adapter

    ad = report.get("adapter") or {}
    if not ad.get("path"):
        return {}  # two checkpoints: no adapter, no method vectors
    adapter = load_adapter(ad["path"])
    method = adapter.method
    kinds = getattr(method, "VECTORS", {}) or {}
    out = {name: {"kind": kind, "label": label, "method": method.label, "modules": {}}
           for name, (kind, label) in kinds.items()}
    for rec in report["modules"]:
        name = rec["name"]
        if name not in adapter.tensors:
            continue
        for key, v in method.vectors(adapter.tensors[name], adapter.config.modules[name]).items():
            out[key]["modules"][name] = {"type": rec["type"], "layer": rec["layer"],
                                         "values": v.detach().double().cpu().numpy()}
    return {k: v for k, v in out.items() if v["modules"]}


def _panels(plt, n: int):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 0.6, 2.9 * rows + 0.9),
                             squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _by_type(entry: dict) -> dict:
    types: dict = {}
    for name, m in entry["modules"].items():
        types.setdefault(m["type"], []).append((name, m))
    return types


def by_index(entry: dict):
    """One panel per module type: each module's vector over the singular index."""
    from adaptedit.report import require_matplotlib

    plt = require_matplotlib()
    import numpy as np

    types = _by_type(entry)
    fig, axes = _panels(plt, len(types))
    layers = [m["layer"] for m in entry["modules"].values() if m["layer"] is not None]
    top = max(layers, default=0) or 1
    cmap = plt.get_cmap("viridis")
    banded = False
    for ax, (typ, mods) in zip(axes, types.items()):
        width = min(len(m["values"]) for _, m in mods)
        stack = np.stack([m["values"][:width] for _, m in mods])
        if len(mods) <= LINES_MAX:
            for name, m in mods:
                v = m["values"]
                ax.plot(range(len(v)), v, lw=0.9, alpha=0.7, gid=name,
                        color=cmap((m["layer"] or 0) / top))
        else:  # dozens of overlapping lines read as one blot: the spread across modules instead
            banded = True
            lo, mid, hi = np.percentile(stack, [BAND[0], 50, BAND[1]], axis=0)
            ax.fill_between(range(width), lo, hi, color="tab:blue", alpha=0.3, lw=0,
                            gid="band", label=f"{BAND[0]}-{BAND[1]}% of modules")
            ax.plot(range(width), mid, color="tab:blue", lw=1.2, gid="median", label="median")
        mean = np.abs(stack).mean(axis=0)
        ax.plot(range(width), mean, color="black", lw=1.6, gid="mean_abs", label="mean |·|")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"{typ} ({len(mods)} modules)", fontsize=9)
        ax.set_xlabel("singular index (0 = largest σ)", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_ylabel(entry["label"], fontsize=8)
    how = "median and spread over modules" if banded else "colour: layer, dark = first"
    fig.suptitle(f"{entry['method']}: {entry['label']} per singular index ({how})", fontsize=10)
    fig.tight_layout()
    return fig


def distribution(entry: dict):
    """One panel per module type: a histogram of the values of all its modules."""
    from adaptedit.report import require_matplotlib

    plt = require_matplotlib()
    import numpy as np

    types = _by_type(entry)
    fig, axes = _panels(plt, len(types))
    for ax, (typ, mods) in zip(axes, types.items()):
        v = np.concatenate([m["values"] for _, m in mods])
        ax.hist(v, bins=BINS, color="tab:blue", alpha=0.8)
        ax.axvline(float(v.mean()), color="black", lw=1.2)
        ax.set_title(f"{typ}: mean {v.mean():.4g}, std {v.std():.2g} ({len(mods)} modules)",
                     fontsize=8)
        ax.set_xlabel(entry["label"], fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("count", fontsize=8)
    fig.suptitle(f"{entry['method']}: {entry['label']} per layer type", fontsize=10)
    fig.tight_layout()
    return fig


def figures(report: dict, data: dict | None = None) -> dict:
    """{file name: figure} for the method's vectors (empty when the method exposes none)."""
    data = method_vectors(report) if data is None else data
    draw = {"by_index": by_index, "distribution": distribution}
    return {f"{e['kind']}_{name}.png": draw[e["kind"]](e) for name, e in data.items()}
