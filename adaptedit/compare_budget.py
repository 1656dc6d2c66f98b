"""``compare --budget params``: trainable parameters per method, and ranks matched to a budget.

The budget is the first method's trainable parameter count. A method with a rank (``RANKED``)
gets the rank whose count is closest to it; a method without one (IA3, RoAd: ``RANKED = False``)
has a fixed count. A method whose count (its closest, or its fixed one) is more than
:data:`TOLERANCE` away from the budget is refused before any run: "matched budgets" that are not
matched would be read as evidence they are not (docs/compare.md).

Counts are the method's own: θ₀ of one module per shape and type, built by the method's ``init``
on a zero matrix with the options its ``plan`` resolves — so any method of the registry is counted.
Rank searches respect what the method's ``plan`` accepts (HRA: even ranks; OFT: divisors of the
input width, whose counts fall as the rank — the number of blocks — grows; VeRA: ranks beyond the
module dimensions).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from adaptedit import methods
from adaptedit.errors import AdapteditError

TOLERANCE = 0.2  # |count / budget − 1| allowed under --budget params
SEARCH_MAX = 1 << 20  # the largest rank tried for methods whose rank is not bounded by the shapes


def _options(method, opts) -> dict:
    return {**method.OPTIONS, **(opts.options or {})}


def trainable_count(targets, opts) -> int:
    """Trainable parameters of ``opts``'s adapter (an :class:`~adaptedit.init.InitOptions`) on
    ``targets``: θ₀ of one module per shape and module type, from the method's own init on a zero
    matrix with the options its ``plan`` resolves."""
    from adaptedit.init import scaling_for

    from adaptedit.targets import parse_pattern, pattern_value

    method = methods.resolve(opts.method, opts.dora)
    base = _options(method, opts)
    pattern = parse_pattern(opts.rank_pattern) if method.RANKED else {}
    if (opts.rank is None and not pattern) or not method.RANKED:  # the method's own default sizes
        default = method.DEFAULT_RANK
        ranks0 = {t.name: default for t in targets} if default is not None else {}
        ranks, options = method.plan(targets, ranks0, base, False)
    else:  # --rank, and --rank-pattern's rank for the modules it matches (as init)
        default = opts.rank if opts.rank is not None else method.DEFAULT_RANK
        want = {t.name: int(pattern_value(t.name, pattern, default)) for t in targets}
        capped = {t.name: min(want[t.name], t.out_features, t.in_features) for t in targets}
        try:  # the method's own rank rule first (VeRA: one rank, not bounded by the shapes)
            ranks, options = method.plan(targets, want, base, True)
        except AdapteditError:
            ranks, options = method.plan(targets, capped, base, True)
    groups: dict = {}
    for t in targets:
        groups.setdefault((t.out_features, t.in_features, t.module_type, ranks.get(t.name)),
                          []).append(t)
    total = 0
    for (o, i, _, _), members in groups.items():
        rank = ranks[members[0].name]
        alpha = opts.alpha if opts.alpha is not None else method.default_alpha(rank)
        scaling = scaling_for(alpha, rank, opts.rslora) if method.SCALED else 1.0
        theta = method.init(torch.zeros(1, o, i), {
            **options, "rank": rank, "scaling": scaling,
            "generator": torch.Generator().manual_seed(0), "svd": "full", "niter": 0,
            "oversample": 0, "delora_lambda": opts.delora_lambda, "names": [members[0].name]})
        total += len(members) * sum(theta[k][0].numel() for k in method.TRAINABLE)
    return total


def _accepts(method, targets, options: dict, r: int) -> bool:
    """The method's plan accepts rank r on every target as given (no capping)."""
    try:
        method.plan(targets, {t.name: r for t in targets}, dict(options), True)
    except AdapteditError:
        return False
    return True


def match_params(targets, opts, goal: int) -> tuple[int, int]:
    """The rank whose trainable count is closest to ``goal`` (ties: the smaller rank), among the
    ranks the method's plan accepts. Returns (rank, count)."""
    method = methods.resolve(opts.method, opts.dora)
    options = _options(method, opts)
    count: dict = {}

    def c(r):
        if r not in count:
            count[r] = trainable_count(targets, replace(opts, rank=r))
        return count[r]

    top = min(min(t.out_features, t.in_features) for t in targets)
    cand = [r for r in range(1, top + 1) if _accepts(method, targets, options, r)]
    if not cand:
        raise AdapteditError(f"--budget params: {method.label} accepts no rank between 1 and "
                             f"{top} on these targets; give its rank with --method-option "
                             f"{method.label}:rank=R or use --budget rank")
    hi = cand[-1]
    if hi == top and _accepts(method, targets, options, 2 * top) and c(2 * top) > c(top):
        while hi < SEARCH_MAX and c(hi) < goal and _accepts(method, targets, options, 2 * hi):
            hi *= 2  # not bounded by the smallest module (VeRA; HRA up to the input width): grow
        cand = cand + [r for r in range(top + 1, hi + 1)
                       if _accepts(method, targets, options, r)]
    inc = c(cand[-1]) >= c(cand[0])  # counts grow with r (most) or fall (OFT: blocks)

    def key(r):
        return c(r) if inc else -c(r)

    g = goal if inc else -goal
    i, j = 0, len(cand) - 1
    while i < j:  # the first candidate with key ≥ g (keys are monotone along cand)
        mid = (i + j) // 2
        i, j = (mid + 1, j) if key(cand[mid]) < g else (i, mid)
    near = [cand[i]] + ([cand[i - 1]] if i > 0 else [])
    best = min(near, key=lambda r: (abs(c(r) - goal), r))
    return best, c(best)


def check(spec: str, ranked: bool, params: int, goal: int, first: str, rank) -> None:
    """Refuse a method whose count is more than TOLERANCE off the budget, naming it."""
    ratio = params / goal if goal else float("inf")
    if abs(ratio - 1) <= TOLERANCE:
        return
    pct = f"±{TOLERANCE:.0%}"
    if not ranked:
        raise AdapteditError(
            f"--budget params: {spec} has no rank, so its {params:,} trainable parameters are "
            f"fixed: {ratio:.2f}× {first}'s budget of {goal:,} (allowed {pct}); drop {spec}, make "
            "it the first method (it then sets the budget), or use --budget rank (each method at "
            "its own count, shown in the table)")
    raise AdapteditError(
        f"--budget params: {spec}'s closest count is {params:,} (r={rank}), {ratio:.2f}× "
        f"{first}'s budget of {goal:,} (allowed {pct}); choose another first method or its "
        f"rank, a larger form of {spec} (--method-option), or use --budget rank")
