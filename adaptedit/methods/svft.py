"""SVFT: move W within its own singular basis — ΔW = U_r M V_rᵀ with M sparse and learned.

    W = U Σ Vᵀ;   ΔW = U_r M V_rᵀ        U_r, V_r: W's top-r singular vectors (frozen)
    M (r × r) sparse, its pattern fixed at init;  M₀ = 0            (so ΔW = 0 bit for bit)

Hypothesis: the update lives in W's own singular basis — fine-tuning re-weights the directions W
already has (the diagonal of M: ΔΣ) and, with off-diagonal entries, mixes neighbouring ones,
instead of adding new directions.
Lingam et al., "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors", NeurIPS 2024,
arXiv:2405.19597.

Patterns of M (``--svft-pattern``, the paper's variants):
- ``plain`` (default): M = diag(m), r entries — each is the change ΔΣ of one singular value.
- ``banded``: the diagonal and ``--svft-off-diagonals d`` (default 2) diagonals on each side,
  r(2d + 1) − d(d + 1) entries (the authors' code: offsets 0, ±1 … ±d).
- ``random``: ``--svft-random-k k`` (default 5, the interior row count of banded d = 2) distinct
  random columns in every row, r·k entries, drawn from ``--seed`` at init; the positions are stored
  in the adapter (``svft_rows``, ``svft_cols``), so reloading never draws a different pattern. (The
  authors' code draws row and column of each entry independently, with repeats; one set of k per
  row, as the paper describes it, gives each row the same number of parameters.)
M₀ = 0 in every variant: the authors' code starts M at Gaussian noise behind a gate σ(0) = ½, which
changes W at init; here the adapted model equals the base exactly at init.

- r (``--rank``, default 16): the number of top singular triplets; ``--rank min(out, in)`` is the
  paper's full basis. U_r and V_rᵀ are stored in float32 (r·(out + in) frozen numbers per module)
  next to σ_r (``svft_s``, for inspect), from the exact float64 SVD PiSSA uses
  (:func:`adaptedit.linalg.extreme_svd`, shared within ``linalg.shared_svd``).
- Forward: factored, y = W x + U_r (M (V_rᵀ x)) added in float32 and rounded once; M acts on the r
  coordinates as a gather and a scatter-add over its entries (O(tokens · entries)); no dense ΔW and
  no dense M is formed during training.
- Merge and inspect: ΔW = (U_r M) V_rᵀ in float32 (the factors of inspect's SVD).
- No PEFT form: PEFT has no SVFT adapter type (and a LoRA export would hide the method); merge
  is the deployment path.
- inspect: the learned ΔΣ = diag(M) (mean and max |ΔΣ|, ‖ΔΣ‖/‖σ_r‖, the index that moved most),
  the off-diagonal share ‖M − diag(M)‖/‖M‖, and ΔΣ per singular index (``spectrum``: the plot).
"""

from __future__ import annotations

import torch

from adaptedit.errors import AdapteditError, UsageError
from adaptedit.linalg import extreme_svd
from adaptedit.methods.base import check_ranks

PAPER = "Lingam et al., SVFT, NeurIPS 2024 (arXiv:2405.19597)"
TRAINABLE = ("svft_m",)
SVD = "full"  # the exact float64 SVD (PiSSA's), cached within linalg.shared_svd
SCALED = False  # no α, no rsLoRA
PATTERNS = ("plain", "banded", "random")
OPTIONS = {"svft_pattern": "plain", "svft_off_diagonals": None, "svft_random_k": None}
DEFAULT_OFF_DIAGONALS, DEFAULT_RANDOM_K = 2, 5
LR = 5e-2  # the authors' scripts for plain (MetaMath/run_math.sh, LLM-Adapters/run_commonsense.sh)
LR_SOURCE = "SVFT authors' scripts (plain 5e-2; banded/random d = 16: 5e-3, pass --lr)"
PEFT = ("PEFT has no SVFT adapter type (and an exact LoRA of U M Vᵀ would not train as "
        "SVFT); deploy with `adaptedit merge`")
# what inspect plots for this method: ΔΣ = diag(M) per singular index
VECTORS = {"dsigma": ("by_index", "ΔΣ_i = M_ii (learned change of σ_i)")}


def default_alpha(rank: int) -> float:
    return 1.0  # unused: no scaling


def plan(targets, ranks: dict, options: dict, rank_given: bool) -> tuple[dict, dict]:
    """The pattern and its size, checked against every module's rank (naming the module)."""
    pattern = options.get("svft_pattern") or "plain"
    d, k = options.get("svft_off_diagonals"), options.get("svft_random_k")
    if pattern not in PATTERNS:
        raise UsageError(f"--svft-pattern {pattern!r}: use plain, banded or random")
    if d is not None and pattern != "banded":
        raise UsageError("--svft-off-diagonals applies to --svft-pattern banded; drop it or use "
                         "that pattern")
    if k is not None and pattern != "random":
        raise UsageError("--svft-random-k applies to --svft-pattern random; drop it or use that "
                         "pattern")
    for name, v in (("--svft-off-diagonals", d), ("--svft-random-k", k)):
        if v is not None and (v != int(v) or v < (0 if name.endswith("diagonals") else 1)):
            raise UsageError(f"{name} {v}: must be an integer ≥ "
                             f"{0 if name.endswith('diagonals') else 1}")
    if pattern == "banded":
        d = DEFAULT_OFF_DIAGONALS if d is None else int(d)
    if pattern == "random":
        k = DEFAULT_RANDOM_K if k is None else int(k)
    check_ranks(targets, ranks)
    for t in targets:
        r = ranks[t.name]
        if pattern == "banded" and d >= r:
            raise AdapteditError(f"--svft-off-diagonals {d} needs rank > {d}, and {t.name} has rank "
                                 f"{r}; raise --rank or lower --svft-off-diagonals")
        if pattern == "random" and k > r:
            raise AdapteditError(f"--svft-random-k {k} exceeds the rank {r} of {t.name} (k entries "
                                 "of a row of M); raise --rank or lower --svft-random-k")
    return ranks, {"svft_pattern": pattern, "svft_off_diagonals": d, "svft_random_k": k}


def banded(r: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the band |i − j| ≤ d of an r × r matrix, row by row."""
    i = torch.arange(r).unsqueeze(1)
    j = i + torch.arange(-d, d + 1).unsqueeze(0)
    keep = (j >= 0) & (j < r)
    return i.expand_as(j)[keep], j[keep]


def random_pattern(r: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols): k distinct random columns in each of the r rows (sorted within a row)."""
    cols = torch.rand(r, r, generator=generator).topk(k, dim=1).indices.sort(dim=1).values
    return torch.arange(r).repeat_interleave(k), cols.reshape(-1)


def init(w: torch.Tensor, opts: dict) -> dict:
    u, s, vh = extreme_svd(w, opts["rank"], False)
    out = {"svft_U": u.float().contiguous(), "svft_V": vh.float().contiguous(),
           "svft_s": s.float().contiguous()}
    b, r = s.shape
    pattern = opts.get("svft_pattern") or "plain"
    if pattern == "plain":
        out["svft_m"] = torch.zeros(b, r)
        return out
    if pattern == "banded":
        rows, cols = banded(r, int(opts["svft_off_diagonals"]))
        rows, cols = rows.expand(b, -1), cols.expand(b, -1)
    else:  # one pattern per module, drawn in module order from the seeded generator
        pairs = [random_pattern(r, int(opts["svft_random_k"]), opts["generator"]) for _ in range(b)]
        rows, cols = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    out["svft_rows"] = rows.float().contiguous()  # stored as float32 like every adapter tensor
    out["svft_cols"] = cols.float().contiguous()
    out["svft_m"] = torch.zeros(rows.shape)
    return out


def sparse(t: dict) -> bool:
    return "svft_rows" in t


def dense_m(t: dict) -> torch.Tensor:
    """M as a dense r × r float32 matrix (merge and inspect only; never in the forward pass)."""
    m = t["svft_m"].float()
    r = t["svft_U"].shape[-1]
    if not sparse(t):
        return torch.diag(m)
    out = m.new_zeros(r, r)
    return out.index_put((t["svft_rows"].long(), t["svft_cols"].long()), m, accumulate=True)


def terms(t: dict, scaling: float, rank: int) -> list:
    if not sparse(t):
        return [(1.0, t["svft_U"] * t["svft_m"].unsqueeze(-2), t["svft_V"])]
    return [(1.0, t["svft_U"] @ dense_m(t), t["svft_V"])]


def apply_m(t: dict, h: torch.Tensor) -> torch.Tensor:
    """M h for row vectors h (…, r): z_i = Σ_{(i, j) ∈ pattern} m_ij h_j (gather, scatter-add)."""
    m = t["svft_m"]
    if not sparse(t):
        return h * m
    rows, cols = t["svft_rows"].long(), t["svft_cols"].long()
    return h.new_zeros(h.shape).index_add(-1, rows, h[..., cols] * m)


def delta_x(layer, x: torch.Tensor) -> torch.Tensor:
    """ΔW x = U (M (Vᵀ x)) in float32 (the factored forward: no dense ΔW, no dense M)."""
    t = layer.tensors()
    h = layer.dropout(x).to(t["svft_V"].dtype) @ t["svft_V"].transpose(-1, -2)
    return apply_m(t, h) @ t["svft_U"].transpose(-1, -2)


def is_identity(t: dict) -> bool:
    return not bool(torch.count_nonzero(t["svft_m"]))


def validate(t: dict, info) -> str | None:
    out_f, in_f = info.shape
    r = info.rank
    want = {"svft_U": (out_f, r), "svft_V": (r, in_f)}
    if not sparse(t):
        want["svft_m"] = (r,)
    for k, shape in want.items():
        if k not in t or tuple(t[k].shape) != shape:
            got = tuple(t[k].shape) if k in t else "missing"
            return f"{k} is {got}; a {out_f}×{in_f} module at rank {r} needs {shape}"
    if sparse(t):
        n = t["svft_m"].shape
        for k in ("svft_rows", "svft_cols"):
            if k not in t or t[k].shape != n or t["svft_m"].dim() != 1:
                return f"{k} must list the {tuple(n)} positions of svft_m's entries"
            v = t[k]
            if v.numel() and (bool((v != v.round()).any()) or float(v.min()) < 0
                              or float(v.max()) >= r):
                return f"{k} holds positions outside 0 … {r - 1} (M is {r}×{r})"
    return None


def vectors(t: dict, info) -> dict:
    """ΔΣ per singular index: the diagonal of M (what inspect plots)."""
    return {"dsigma": torch.diagonal(dense_m(t)).double()}


def extras(t: dict, info, w, fro: float) -> dict:
    """The learned ΔΣ: its size, relative to σ_r, the singular index that moved most, and the
    share of M off its diagonal."""
    full = dense_m(t).double()
    m = torch.diagonal(full)
    out = {"svft_dsigma_mean_abs": float(m.abs().mean()),
           "svft_dsigma_max_abs": float(m.abs().max()),
           "svft_top_index": int(m.abs().argmax())}
    if "svft_s" in t:
        s = t["svft_s"].double()
        out["svft_dsigma_rel"] = float(m.norm() / s.norm()) if s.norm() > 0 else None
    if sparse(t):
        total = full.norm()
        out["svft_offdiag_share"] = float((full - torch.diag(m)).norm() / total) if total > 0 \
            else 0.0
    return out
