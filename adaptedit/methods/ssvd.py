"""SSVD: rotate what a layer reads and rescale how strongly, inside W's top-k singular triplets.

    W = U Σ Vᵀ;   W' = U_k (Σ_k + ΔΣ) G V_kᵀ + W_res,   W_res = W − U_k Σ_k V_kᵀ
    G = (I − S)(I + S)⁻¹  (Cayley, S skew-symmetric k × k: G orthogonal, G = I at S = 0)
    θ₀: ΔΣ = 0, S = 0                                                 (so W' = W bit for bit)

Hypothesis: adaptation rotates the input singular directions a layer reads (G turns the right
singular vectors V_k among themselves) and rescales how strongly it responds to them (ΔΣ), within
W's own principal subspace — the singular basis of SVFT, plus a rotation of what the layer reads.
SSVD, Wang et al., 2025; AntiPaSTO, Clark, 2026, arXiv:2601.07473 (the same U (Σ + ΔΣ) G Vᵀ + W_res
form with a Cayley-rotated input basis; its reference code rotates V by default, block-diagonally,
and starts ΔΣ at a small positive value — here G is one k × k Cayley and ΔΣ₀ = 0, so the adapted
model equals the base exactly at init).

- The update is computed as a delta, never by re-adding W_res:
      ΔW = U_k [(Σ + ΔΣ) G − Σ] V_kᵀ = U_k C V_kᵀ,   C = (Σ + ΔΣ)(G − I) + ΔΣ,   G − I = −2 S (I + S)⁻¹
  At θ₀ the k × k matrix C is exactly zero (S = 0 gives (I + S)⁻¹ S = 0, ΔΣ = 0), so the forward
  pass adds exactly 0 and merge writes W itself: F(W, θ₀) = W bit for bit in every dtype. Writing
  W' as U(Σ + ΔΣ)G Vᵀ + (W − UΣVᵀ) would round twice and miss W by ~1e-7·‖W‖.
- G convention: G = (I − S)(I + S)⁻¹, OFT's Cayley (S from its k(k − 1)/2 upper-triangle entries,
  ``ssvd_S``, OFT's order), so W' = W + U_k C V_kᵀ with G acting on the rows of V_kᵀ: the rotated
  right singular vectors are the rows of G V_kᵀ.
- k (``--rank``, default 16): the number of top triplets. U_k, V_kᵀ, σ_k (float32, frozen) come
  from the exact float64 SVD PiSSA and SVFT use (:func:`adaptedit.linalg.extreme_svd`, shared
  within ``linalg.shared_svd``: no second SVD). Trainable: k + k(k − 1)/2 = k(k + 1)/2 per module.
- Forward: factored, y = W x + U_k (C (V_kᵀ x)) added in float32 and rounded once (the low-rank
  path: B = U_k C, A = V_kᵀ); C is k × k, rebuilt per step; no dense ΔW during training.
- No PEFT form: PEFT has no SSVD adapter type; merge is the deployment path.
- inspect: ΔΣ (mean and max |ΔΣ|, ‖ΔΣ‖/‖σ_k‖, the index that moved most), the rotation ‖G − I‖_F
  and its largest angle, and per singular index ΔΣ_i and how far v_i turned, ‖(G − I) e_i‖.
"""

from __future__ import annotations

import math

import torch

from adaptedit.linalg import extreme_svd
from adaptedit.methods.oft import skew

PAPER = "Wang et al., SSVD, 2025; Clark, AntiPaSTO, 2026 (arXiv:2601.07473)"
TRAINABLE = ("ssvd_dsigma", "ssvd_S")
SVD = "full"  # the exact float64 SVD (PiSSA's), cached within linalg.shared_svd
SCALED = False  # no α, no rsLoRA
LR = 5e-3  # untuned: the SVFT authors' value for their banded/random variants; no SSVD value checked
LR_SOURCE = "untuned (SVFT authors' banded/random value; no SSVD/AntiPaSTO value checked)"
PEFT = ("PEFT has no SSVD adapter type (and a LoRA export would hide the rotation G and ΔΣ); "
        "deploy with `adaptedit merge`")
VECTORS = {"dsigma": ("by_index", "ΔΣ_i (learned change of σ_i)"),
           "rotation": ("by_index", "‖(G − I) e_i‖ (how far v_i turned)")}


def default_alpha(rank: int) -> float:
    return 1.0  # unused: no scaling


def init(w: torch.Tensor, opts: dict) -> dict:
    u, s, vh = extreme_svd(w, opts["rank"], False)
    b, k = s.shape
    return {"ssvd_dsigma": torch.zeros(b, k), "ssvd_S": torch.zeros(b, k * (k - 1) // 2),
            "ssvd_U": u.float().contiguous(), "ssvd_V": vh.float().contiguous(),
            "ssvd_s": s.float().contiguous()}


def rotation_minus_identity(t: dict) -> torch.Tensor:
    """G − I = −2 S (I + S)⁻¹ (k × k, float32): exactly 0 at S = 0."""
    k = t["ssvd_s"].shape[-1]
    s = skew(t["ssvd_S"].float().unsqueeze(0), k)[0]
    eye = torch.eye(k, dtype=s.dtype, device=s.device)
    return -2.0 * torch.linalg.solve(eye + s, s, left=False)  # X (I + S) = S


def inner(t: dict) -> torch.Tensor:
    """C = (Σ + ΔΣ)(G − I) + ΔΣ = (Σ + ΔΣ) G − Σ (k × k, float32)."""
    d = t["ssvd_dsigma"].float()
    c = (t["ssvd_s"].float() + d).unsqueeze(-1) * rotation_minus_identity(t)
    return c + torch.diag(d)


def terms(t: dict, scaling: float, rank: int) -> list:
    return [(1.0, t["ssvd_U"] @ inner(t), t["ssvd_V"])]


def is_identity(t: dict) -> bool:
    return not (bool(torch.count_nonzero(t["ssvd_dsigma"]))
                or bool(torch.count_nonzero(t["ssvd_S"])))


def validate(t: dict, info) -> str | None:
    out_f, in_f = info.shape
    k = info.rank
    want = {"ssvd_dsigma": (k,), "ssvd_S": (k * (k - 1) // 2,), "ssvd_s": (k,),
            "ssvd_U": (out_f, k), "ssvd_V": (k, in_f)}
    for name, shape in want.items():
        if name not in t or tuple(t[name].shape) != shape:
            got = tuple(t[name].shape) if name in t else "missing"
            return f"{name} is {got}; a {out_f}×{in_f} module at rank {k} needs {shape}"
    return None


def vectors(t: dict, info) -> dict:
    """Per singular index: ΔΣ_i, and ‖(G − I) e_i‖ — how far the i-th input direction turned."""
    gmi = rotation_minus_identity(t).double()
    return {"dsigma": t["ssvd_dsigma"].double(), "rotation": gmi.norm(dim=0)}


def extras(t: dict, info, w, fro: float) -> dict:
    d = t["ssvd_dsigma"].double()
    s = t["ssvd_s"].double()
    g = rotation_minus_identity(t).double() + torch.eye(d.numel(), dtype=torch.float64)
    angles = torch.linalg.eigvals(g).angle().abs() * (180 / math.pi)
    return {"ssvd_dsigma_mean_abs": float(d.abs().mean()), "ssvd_dsigma_max_abs": float(d.abs().max()),
            "ssvd_dsigma_rel": float(d.norm() / s.norm()) if s.norm() > 0 else None,
            "ssvd_top_index": int(d.abs().argmax()),
            "ssvd_g_minus_i": float((g - torch.eye(d.numel(), dtype=torch.float64)).norm()),
            "ssvd_angle_max_deg": float(angles.max()) if angles.numel() else 0.0}
