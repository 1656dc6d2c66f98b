"""DeLoRA: decouple the angle of an update from its strength.

    ΔW = (1/r) · (λ · B Ξ A − λ₀ · B₀ Ξ₀ A₀) · diag(c),   Ξ = diag(1 / (‖bᵢ‖ ‖aᵢ‖)),  c_j = ‖W[:, j]‖

bᵢ is column i of B, aᵢ row i of A, c the column norms of W (fixed at init, as PEFT's
``delora_w_norm``). Each normalised rank-1 term has unit Frobenius norm, so
‖ΔW‖_F ≤ (λ + λ₀) · max_j c_j ≤ (λ + λ₀) ‖W‖₂: the learnable scalar λ bounds the strength, A and B
only steer the direction. Init is the paper's frozen copy: A, B random (kaiming-uniform), θ₀ = θ, so
ΔW = 0 exactly and gradients reach every parameter from step one.
Bini et al., "Decoupling Angles and Strength in Low-rank Adaptation", ICLR 2025, arXiv:2503.18225.
"""

import math

import torch

PAPER = "Bini et al., DeLoRA, ICLR 2025 (arXiv:2503.18225)"
TRAINABLE = ("lora_A", "lora_B", "delora_lambda")
OPTIONS = {"delora_lambda": 15.0}  # the initial strength λ (--delora-lambda)
EPS = 1e-4  # clamp on ‖aᵢ‖, ‖bᵢ‖ (as PEFT)


def default_alpha(rank: int) -> float:
    return float(rank)  # unused: the strength is λ


def init(w: torch.Tensor, opts: dict) -> dict:
    b, out_f, in_f = w.shape
    rank = opts["rank"]
    g = opts["generator"]
    bound_a, bound_b = 1.0 / math.sqrt(in_f), 1.0 / math.sqrt(rank)
    a = torch.rand(b, rank, in_f, generator=g) * (2 * bound_a) - bound_a
    bb = torch.rand(b, out_f, rank, generator=g) * (2 * bound_b) - bound_b
    lam = torch.full((b, 1), float(opts.get("delora_lambda", 15.0)))
    c = torch.linalg.vector_norm(w, dim=-2)  # (b, in): column norms
    return {"lora_A": a, "lora_B": bb, "delora_lambda": lam,
            "lora_A0": a.clone(), "lora_B0": bb.clone(), "delora_lambda0": lam.clone(),
            "delora_wnorm": c}


def _normalised(b: torch.Tensor, a: torch.Tensor, lam: torch.Tensor, c: torch.Tensor, rank: int):
    xi = lam / rank / (a.norm(dim=-1).clamp_min(EPS) * b.norm(dim=-2).clamp_min(EPS))  # (r,)
    return b * xi, a * c  # B·diag(λΞ/r), A·diag(c)


def terms(t: dict, scaling: float, rank: int) -> list:
    c = t["delora_wnorm"]
    b1, a1 = _normalised(t["lora_B"], t["lora_A"], t["delora_lambda"], c, rank)
    b0, a0 = _normalised(t["lora_B0"], t["lora_A0"], t["delora_lambda0"], c, rank)
    return [(1.0, b1, a1), (-1.0, b0, a0)]


def bound(t: dict) -> float:
    """The paper's bound on ‖ΔW‖_F for these tensors: (λ + λ₀) · max_j ‖W[:, j]‖."""
    return float((t["delora_lambda"].abs() + t["delora_lambda0"].abs()).sum()
                 * t["delora_wnorm"].max())


def extras(t: dict, info, w, fro: float) -> dict:
    """The paper's bound and how close ‖ΔW‖_F is to it."""
    b = bound(t)
    return {"delora_bound": b, "delora_fraction": fro / b if b > 0 else None}
