"""The geometry of a weight update, as pure functions on tensors (DESIGN §4).

    ΔW = W₁ − W₀ (out × in),   W₀ = U₀ Σ₀ V₀ᵀ,   ΔW = U_Δ Σ_Δ V_Δᵀ

Nothing here reads files or knows about adapters: :mod:`adaptedit.analysis` feeds these functions
the base weight, its cached SVD and ΔW, either dense or as factors P @ Q (never formed densely).

- Magnitude and direction per output row (DoRA §3.2, Liu et al. 2024):
  ΔM = mean_n |‖W₁[n]‖ − ‖W₀[n]‖|,   ΔD = mean_n (1 − cos(W₁[n], W₀[n])).
- Subspace energy: E(U) = ‖Uᵀ ΔW‖²_F / ‖ΔW‖²_F for an orthonormal U (U₀'s top-k or bottom-k on the
  output side, V₀'s on the input side: ‖ΔW V‖²_F / ‖ΔW‖²_F). From ΔW's SVD: ‖Uᵀ U_Δ Σ_Δ‖²_F.
- Principal angles between two subspaces: arccos of the singular values of AᵀB; the LoRA paper's
  subspace similarity φ(A, B) = ‖AᵀB‖²_F / min(i, j) (Hu et al. 2022, §7).
- Amplification (LoRA §7): ‖ΔW‖_F / ‖U_Δᵀ W₀ V_Δ‖_F, how much ΔW magnifies directions W₀ barely uses.
- Rank: effective rank exp(−Σ pₖ log pₖ), pₖ = σₖ/Σσ (Roy & Vetterli 2007); stable rank Σσ²/σ₁²;
  energy rank: the fewest σ whose squares hold a fraction of Σσ².
- Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
  2024): top singular vectors of W₁ whose best |cos| with every left singular vector of W₀ is < ε.
"""

from __future__ import annotations

import torch

# ----------------------------------------------------------------------------------------------
# spectra


def effective_rank(s: torch.Tensor) -> float:
    """exp(−Σ pₖ log pₖ) with pₖ = σₖ / Σσ (0 for an all-zero spectrum)."""
    s = s.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """Σσ² / σ₁² (0 for an all-zero spectrum)."""
    s = s.double()
    top = s.abs().max() if s.numel() else torch.tensor(0.0)
    return float((s ** 2).sum() / top ** 2) if top > 0 else 0.0


def energy_rank(s: torch.Tensor, fraction: float) -> int:
    """The fewest leading singular values whose squares hold ``fraction`` of Σσ² (0 if ΔW = 0)."""
    e = s.double().sort(descending=True).values ** 2
    total = e.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(e, 0) / total
    # tolerate rounding: a spectrum holding exactly the fraction counts
    return int(torch.searchsorted(cum, torch.tensor(fraction - 1e-12, dtype=cum.dtype))) + 1


def rank_stats(s: torch.Tensor) -> dict:
    return {"effective_rank": effective_rank(s), "stable_rank": stable_rank(s),
            "energy_rank_90": energy_rank(s, 0.90), "energy_rank_99": energy_rank(s, 0.99)}


# ----------------------------------------------------------------------------------------------
# SVD of the update


def delta_svd(p: torch.Tensor | None = None, q: torch.Tensor | None = None, *,
              dense: torch.Tensor | None = None):
    """Thin SVD of ΔW, from factors P (out × r) @ Q (r × in) in O((out+in)r²) or from a dense ΔW.

    Returns U (out × k), S (k), Vh (k × in) in float64, singular values descending.
    """
    if dense is not None:
        return torch.linalg.svd(dense.double(), full_matrices=False)
    from adaptedit.linalg import lowrank_svd

    return lowrank_svd(p.double(), q.double())


def numerical_rank(s: torch.Tensor, shape) -> int:
    """Singular values above the usual rounding threshold max(shape) · ε · σ₁ (float32 ε)."""
    if s.numel() == 0 or s[0] <= 0:
        return 0
    tol = max(shape) * torch.finfo(torch.float32).eps * float(s[0])
    return int((s > tol).sum())


# ----------------------------------------------------------------------------------------------
# magnitude and direction (DoRA §3.2)


def _md_from_rows(n0sq: torch.Tensor, dot: torch.Tensor, n1sq: torch.Tensor) -> tuple[float, float]:
    """ΔM, ΔD from ‖W₀[n]‖², W₀[n]·W₁[n] and ‖W₁[n]‖² (float64, rows where both norms > 0)."""
    n0, n1 = n0sq.clamp_min(0).sqrt(), n1sq.clamp_min(0).sqrt()
    dm = (n1 - n0).abs().mean()
    ok = (n0 > 0) & (n1 > 0)
    cos = torch.where(ok, dot / (n0 * n1).clamp_min(1e-300), torch.ones_like(dot)).clamp(-1, 1)
    return float(dm), float((1 - cos).mean())


def magnitude_direction(w0: torch.Tensor, w1: torch.Tensor) -> tuple[float, float]:
    """(ΔM, ΔD) between two dense weights (out × in), per output row, in float64."""
    w0, w1 = w0.double(), w1.double()
    return _md_from_rows((w0 * w0).sum(1), (w0 * w1).sum(1), (w1 * w1).sum(1))


def magnitude_direction_lowrank(w0: torch.Tensor, p: torch.Tensor, q: torch.Tensor
                                ) -> tuple[float, float]:
    """(ΔM, ΔD) for W₁ = W₀ + P Q without forming P Q:

        W₀[n]·ΔW[n] = Σₖ P[n,k] (W₀ Qᵀ)[n,k],   ‖ΔW[n]‖² = Σₖ P[n,k] (P QQᵀ)[n,k]
    """
    w0, p, q = w0.double(), p.double(), q.double()
    n0sq = (w0 * w0).sum(1)
    cross = (p * (w0 @ q.T)).sum(1)  # W₀[n]·ΔW[n]
    dsq = (p * (p @ (q @ q.T))).sum(1)  # ‖ΔW[n]‖²
    return _md_from_rows(n0sq, n0sq + cross, n0sq + 2 * cross + dsq)


def pearson(x, y) -> float | None:
    """Pearson correlation of two sequences (None for fewer than 3 points or no variance)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    if x.numel() < 3:
        return None
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None


# ----------------------------------------------------------------------------------------------
# subspaces


def subspace_energy(basis: torch.Tensor, u: torch.Tensor, s: torch.Tensor) -> float:
    """‖basisᵀ ΔW‖²_F / ‖ΔW‖²_F for ΔW = U diag(s) Vᵀ (basis and U orthonormal columns, same side).

    The same function gives the input side with V₀'s columns and V_Δ = Vhᵀ.
    """
    total = float((s.double() ** 2).sum())
    if total <= 0:
        return 0.0
    proj = basis.double().T @ (u.double() * s.double())
    return min(1.0, float((proj ** 2).sum()) / total)  # ≤ 1 up to rounding


def two_sided_energy(ub: torch.Tensor, vb: torch.Tensor, u: torch.Tensor, s: torch.Tensor,
                     v: torch.Tensor) -> float:
    """The fraction of ‖ΔW‖²_F that touches span(ub) on the output side or span(vb) on the input
    side: 1 − ‖(I − ub ubᵀ) ΔW (I − vb vbᵀ)‖²_F / ‖ΔW‖²_F, for ΔW = U diag(s) Vᵀ.

    A PiSSA-style update s(BA − B₀A₀) = s(δB A₀ + B₀ δA + δB δA) has its first term in W₀'s top
    right subspace and its second in the top left one: each side alone sees about half of it, both
    together nearly all. An isotropic random update gives 1 − (1 − kₒ/out)(1 − kᵢ/in).
    """
    s = s.double()
    total = float((s ** 2).sum())
    if total <= 0:
        return 0.0
    ub, vb, u, v = ub.double(), vb.double(), u.double(), v.double()
    x = u - ub @ (ub.T @ u)  # (I − P) U_Δ
    y = v - vb @ (vb.T @ v)  # (I − Q) V_Δ
    outside = float(torch.trace((s[:, None] * (x.T @ x)) * s[None, :] @ (y.T @ y)))
    return min(1.0, max(0.0, 1.0 - outside / total))


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (degrees, ascending) between span(a) and span(b), orthonormal columns."""
    cos = torch.linalg.svdvals(a.double().T @ b.double()).clamp(0, 1)
    return torch.rad2deg(torch.arccos(cos))


def subspace_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """The LoRA paper's φ = ‖aᵀb‖²_F / min(i, j) ∈ [0, 1] (a: m × i, b: m × j orthonormal)."""
    k = min(a.shape[1], b.shape[1])
    if k == 0:
        return 0.0
    return float(((a.double().T @ b.double()) ** 2).sum()) / k


def amplification(w0: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float | None:
    """‖ΔW‖_F / ‖U_Δᵀ W₀ V_Δ‖_F (LoRA §7) for ΔW's top singular vectors U_Δ, V_Δ."""
    inner = float(torch.linalg.matrix_norm(u.double().T @ w0.double() @ vh.double().T))
    norm = float(s.double().norm())
    return norm / inner if inner > 0 else None


# ----------------------------------------------------------------------------------------------
# intruder dimensions


def top_left_singular(w: torch.Tensor, k: int, start: torch.Tensor, *,
                      p: torch.Tensor | None = None, q: torch.Tensor | None = None, niter: int = 3):
    """Top-``k`` left singular vectors and values of W = w + P Q by subspace iteration from ``start``.

    P Q (optional) is applied through its factors, never formed. ``start`` (out × b, b ≥ k) should
    nearly contain the answer: for W₁ = W₀ + PQ, W₀'s leading left singular vectors together with
    span(P). Each iteration is one product with WWᵀ; a Rayleigh–Ritz step (SVD of Bᵀ W) finishes.
    Returns U (out × k), S (k), float64.
    """
    w = w.double()
    lowrank = p is not None
    if lowrank:
        p, q = p.double(), q.double()

    def apply(x):  # W x
        return w @ x + p @ (q @ x) if lowrank else w @ x

    def apply_t(y):  # Wᵀ y, as (yᵀ W)ᵀ: BLAS is several times faster this way round for a
        # Fortran-ordered y (what QR returns) than w.T @ y
        yt = y.T
        return (yt @ w + (yt @ p) @ q).T if lowrank else (yt @ w).T

    basis = torch.linalg.qr(start.double()).Q
    for _ in range(niter):
        basis = torch.linalg.qr(apply(apply_t(basis))).Q
    uc, s, _ = torch.linalg.svd(apply_t(basis).T, full_matrices=False)
    return (basis @ uc)[:, :k], s[:k]


def intruders(u1: torch.Tensor, u0: torch.Tensor, eps: float) -> tuple[int, list[float]]:
    """Among the columns of ``u1`` (W₁'s top-k left singular vectors), those whose best |cos| with
    every column of ``u0`` (all of W₀'s left singular vectors) is below ``eps``.

    Returns (count, best |cos| of each column of u1).
    """
    best = (u0.double().T @ u1.double()).abs().amax(0)
    return int((best < eps).sum()), [float(x) for x in best]
