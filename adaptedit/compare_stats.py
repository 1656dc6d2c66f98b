"""Statistics of a comparison: best learning rate on eval data, mean ± std over seeds, and paired
differences to the first method with a 95% Student-t interval (``adaptedit compare``).

For each method the learning rate with the lowest mean final eval loss over seeds is chosen (eval
data only, never test data). At that learning rate, each metric is reported as mean ± sample
standard deviation (n − 1) over seeds. The paired difference of method M to the first method F,
both at their own best learning rate, uses the seeds they share: dᵢ = M(seedᵢ) − F(seedᵢ),

    d̄ ± t₀.₉₇₅,ₙ₋₁ · s_d / √n

and an interval that contains 0 is reported as "within seed noise", never as a win.
"""

from __future__ import annotations

import math

# metric name → (how to read it from a results record, True when lower is better)
METRICS = {
    "final_eval_loss": (lambda r: r["final_eval_loss"], True),
    "test_loss": (lambda r: (r.get("test") or {}).get("loss"), True),
    "exact_match": (lambda r: (r.get("test") or {}).get("exact_match"), False),
    "exact_match_strict": (lambda r: (r.get("test") or {}).get("exact_match_strict"), False),
    "forgetting": (lambda r: r.get("forgetting"), True),
    "loss_10": (lambda r: loss_at(r["train_loss"], 0.1), True),
    "loss_50": (lambda r: loss_at(r["train_loss"], 0.5), True),
    "loss_100": (lambda r: loss_at(r["train_loss"], 1.0), True),
    "e_top": (lambda r: r["geometry"].get("e_top"), None),
    "e_bottom": (lambda r: r["geometry"].get("e_bottom"), None),
    "effective_rank": (lambda r: r["geometry"].get("effective_rank"), None),
    "intruders": (lambda r: r["geometry"].get("intruders"), None),
    "delta_w_fro": (lambda r: r["geometry"].get("fro"), None),
    "corr_md": (lambda r: r["geometry"].get("corr_md"), None),
    "s_per_step": (lambda r: r.get("s_per_step"), True),
    "seconds": (lambda r: r.get("seconds"), True),
}


def loss_at(curve: list, fraction: float) -> float | None:
    """Mean train loss over the 10% of steps ending at ``fraction`` of the run (≥ 1 step)."""
    if not curve:
        return None
    n = len(curve)
    end = max(1, math.ceil(fraction * n))
    width = max(1, n // 10)
    vals = [loss for _, loss in curve[max(0, end - width):end]]
    return sum(vals) / len(vals)


def _t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with ``df`` degrees of freedom (regularised incomplete beta)."""
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b) by its continued fraction (modified Lentz), using the symmetry for convergence."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on the CDF to 1e-12)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def mean_std(values: list) -> dict:
    vals = [float(v) for v in values if v is not None]
    n = len(vals)
    if not n:
        return {"mean": None, "std": None, "n": 0, "values": []}
    m = sum(vals) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return {"mean": m, "std": sd, "n": n, "values": vals}


def paired(a: dict, b: dict, lower_is_better: bool | None) -> dict:
    """Paired difference a − b over the seeds both have ({seed: value}), 95% t-interval."""
    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n < 2:
        return {"n": n, "mean": d[0] if d else None, "low": None, "high": None,
                "verdict": "too few seeds for an interval"}
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    if sd == 0:  # the same difference on every seed (e.g. exact match on few rows): the t-interval
        # is [m, m], which would read as certainty; there is no spread to build an interval from
        return {"n": n, "mean": m, "low": None, "high": None, "std": 0.0,
                "verdict": "no difference on any seed" if m == 0 else
                "the same difference on every seed: no interval"}
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    lo, hi = m - half, m + half
    if lo <= 0 <= hi:
        verdict = "within seed noise"
    elif lower_is_better is None:
        verdict = "higher" if lo > 0 else "lower"
    else:
        verdict = "better" if (hi < 0) == lower_is_better else "worse"
    return {"n": n, "mean": m, "low": lo, "high": hi, "std": sd, "verdict": verdict}


def summarize(results: list, specs: list, info: dict, opts) -> dict:
    """summary.json: the grid, each method at its best lr, and paired differences."""
    by = {}
    for r in results:
        by.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    grid, methods_out, diverged = [], {}, {}
    for spec in specs:
        lrs = by.get(spec, {})
        for lr, runs in sorted(lrs.items()):
            grid.append({"method": spec, "lr": lr, "seeds": [r["seed"] for r in runs],
                         "diverged_seeds": [r["seed"] for r in runs if r.get("diverged")],
                         "final_eval_loss": mean_std([r["final_eval_loss"] for r in runs])})
        # a learning rate that diverged on any seed is not a candidate: its mean over the seeds
        # that survived would favour an unstable setting
        lrs = {lr: runs for lr, runs in lrs.items() if not any(r.get("diverged") for r in runs)}
        if by.get(spec) and not lrs:
            diverged[spec] = "every learning rate diverged on at least one seed"
        if not lrs:
            continue
        best = min(lrs, key=lambda lr: (mean_std([r["final_eval_loss"]
                                                  for r in lrs[lr]])["mean"], lr))
        runs = sorted(lrs[best], key=lambda r: r["seed"])
        methods_out[spec] = {
            "best_lr": best, "rank": info.get(spec, {}).get("rank", runs[0]["rank"]),
            "params": runs[0]["params"], "seeds": [r["seed"] for r in runs],
            "runs": [r["run"] for r in runs],
            "metrics": {k: mean_std([get(r) for r in runs]) for k, (get, _) in METRICS.items()},
        }
    first = specs[0] if specs and specs[0] in methods_out else None
    for spec, m in methods_out.items():
        if first is None or spec == first:
            continue
        mine = {r["seed"]: r for r in by[spec][m["best_lr"]]}
        ref = {r["seed"]: r for r in by[first][methods_out[first]["best_lr"]]}
        m["vs_first"] = {k: paired({s: get(r) for s, r in mine.items()},
                                   {s: get(r) for s, r in ref.items()}, low)
                         for k, (get, low) in METRICS.items()}
    return {"schema": "adaptedit.compare.summary", "first_method": first,
            "best_lr_on": "final eval loss (mean over seeds) on --eval-data",
            "interval": "95% Student-t interval of the paired difference over seeds",
            "methods": methods_out, "grid": grid, "diverged": diverged,
            "table": table(methods_out, first)}


def table(methods_out: dict, first) -> list:
    """The final table's rows (numbers, formatted by the report)."""
    rows = []
    for spec, m in methods_out.items():
        g = m["metrics"]
        rows.append({"method": spec, "params": m["params"], "rank": m["rank"],
                     "best_lr": m["best_lr"], "loss_10": g["loss_10"]["mean"],
                     "loss_50": g["loss_50"]["mean"], "loss_100": g["loss_100"]["mean"],
                     "eval_loss": g["final_eval_loss"], "test_loss": g["test_loss"],
                     "exact_match": g["exact_match"], "e_top": g["e_top"]["mean"],
                     "corr_md": g["corr_md"]["mean"], "s_per_step": g["s_per_step"]["mean"],
                     "vs_first": (m.get("vs_first") or {}).get("final_eval_loss")})
    return rows
