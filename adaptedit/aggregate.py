"""Aggregation of per-module inspect records: by module type, by layer, the whole model; the
plain-language verdict; the ΔM/ΔD correlation; sorting for the table.

Pure functions of the records :mod:`adaptedit.analysis` produces (no files, no tensors).
"""

from __future__ import annotations

import math

from adaptedit import geometry
from adaptedit.errors import UsageError

# metrics aggregated by layer / module type / model: energy-weighted ones use ‖ΔW‖² as weight
WEIGHTED = ("e_top_out", "e_top_in", "e_bottom_out", "e_bottom_in", "e_top", "e_bottom")
MEANS = ("delta_m", "delta_d", "phi", "amplification", "effective_rank", "stable_rank",
         "energy_rank_90", "energy_rank_99", "spectral")
NUMERIC = ("fro", "rel", "spectral", "delta_m", "delta_d", "e_top", "e_bottom", "e_top_out",
           "e_top_in", "e_bottom_out", "e_bottom_in", "e_random", "phi", "angle_min", "angle_mean",
           "amplification", "effective_rank", "stable_rank", "energy_rank_90", "energy_rank_99",
           "intruders", "layer", "k")


def aggregate(records: list[dict]) -> dict:
    """Whole-group figures: ‖ΔW‖ summed in quadrature, subspace energies weighted by ‖ΔW‖²,
    the other metrics averaged over the modules that have them, intruders summed."""
    sq = sum(r["fro"] ** 2 for r in records)
    w0sq = sum(r["w0_fro"] ** 2 for r in records)
    out = {"modules": len(records), "zero": sum(1 for r in records if r["zero"]),
           "fro": math.sqrt(sq), "rel": math.sqrt(sq / w0sq) if w0sq > 0 else None,
           "intruders": sum(r["intruders"] for r in records)}
    for key in WEIGHTED:
        pairs = [(r[key], r["fro"] ** 2) for r in records if r.get(key) is not None]
        wsum = sum(w for _, w in pairs)
        out[key] = sum(v * w for v, w in pairs) / wsum if wsum > 0 else None
    for key in MEANS:
        vals = [r[key] for r in records if r.get(key) is not None and not r["zero"]]
        out[key] = sum(vals) / len(vals) if vals else None
    rand = [r["e_random"] for r in records if r.get("e_random") is not None]
    out["e_random"] = sum(rand) / len(rand) if rand else None
    out["method"] = method_aggregate([r.get("method") or {} for r in records])
    return out


def method_aggregate(extras: list[dict]) -> dict:
    """The method's numeric per-module figures over a group: "*_min" the minimum, "*_max" the
    maximum, the others the mean over the modules that have them."""
    vals: dict = {}
    for e in extras:
        for k, v in e.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                vals.setdefault(k, []).append(float(v))
    return {k: min(v) if k.endswith("_min") else max(v) if k.endswith("_max")
            else sum(v) / len(v) for k, v in vals.items()}


def group(records: list[dict], key: str) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    return {str(k): aggregate(v) for k, v in groups.items()}


def verdict(model: dict, mode: str) -> str:
    """One plain-language line about the whole update."""
    n, zero = model["modules"], model["zero"]
    if zero == n:
        what = "untrained adapter" if mode != "checkpoints" else "identical checkpoints"
        return f"{what}: ΔW = 0 exactly in all {n} modules (nothing to analyse)"
    parts = []
    et, eb, er = model.get("e_top"), model.get("e_bottom"), model.get("e_random") or 0.0
    def sides(a, b):
        fa, fb = model.get(a), model.get(b)
        return (f"; output side {fa:.2f}, input side {fb:.2f}" if fa is not None and fb is not None
                else "")

    def above_random(e):  # the share of what a random update leaves outside, taken by this one
        return e is not None and er < 1 and (e - er) / (1 - er) >= 0.5

    if above_random(et) and (eb is None or et >= eb):
        parts.append(f"update concentrated in the principal subspace (E_top = {et:.2f}"
                     f"{sides('e_top_out', 'e_top_in')})")
    elif above_random(eb):
        parts.append(f"update concentrated in the minor subspace (E_bottom = {eb:.2f}"
                     f"{sides('e_bottom_out', 'e_bottom_in')})")
    elif et is not None:
        eb_txt = f", E_bottom = {eb:.2f}" if eb is not None else ""
        parts.append(f"update spread across the spectrum (E_top = {et:.2f}{eb_txt}; a random "
                     f"update puts ≈ {er:.2f} in each)")
    if model.get("intruders"):
        parts.append(f"{model['intruders']} intruder dimension(s)")
    if model.get("rel") is not None:
        parts.append(f"‖ΔW‖/‖W₀‖ = {model['rel']:.3g}")
    if zero:
        parts.append(f"{zero} of {n} modules unchanged (ΔW = 0 exactly)")
    return "; ".join(parts)


def md_correlation(points: list[dict]) -> dict:
    """corr(ΔD, ΔM) per module type over the points (layers × steps), and their mean."""
    by_type: dict = {}
    for pt in points:
        if pt["fro"] > 0:
            by_type.setdefault(pt["type"], []).append(pt)
    corr = {t: geometry.pearson([p["delta_d"] for p in ps], [p["delta_m"] for p in ps])
            for t, ps in by_type.items()}
    vals = [c for c in corr.values() if c is not None]
    live = [p for ps in by_type.values() for p in ps]
    return {"by_type": corr, "mean": sum(vals) / len(vals) if vals else None,
            "pooled": geometry.pearson([p["delta_d"] for p in live], [p["delta_m"] for p in live]),
            "reference": {"full_ft": -0.62, "dora": -0.31, "lora": 0.83}}


def sort_modules(records: list[dict], metric: str | None, top: int | None) -> list[dict]:
    """Modules by ``metric`` (descending; missing values last), at most ``top`` of them."""
    rows = list(records)
    if metric:
        if metric not in NUMERIC:
            raise UsageError(f"--sort {metric!r}: choose one of {', '.join(NUMERIC)}")
        rows.sort(key=lambda r: (r.get(metric) is None, -(r.get(metric) or 0.0)))
    elif top:
        rows.sort(key=lambda r: -r["fro"])
    return rows[:top] if top else rows
