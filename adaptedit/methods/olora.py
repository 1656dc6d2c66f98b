"""OLoRA: start from an orthonormal basis of W's column space.

    W = Q R (reduced QR),  B₀ = Q[:, :r],  A₀ = R[:r]        (so B₀A₀ = Q_r Q_rᵀ W)
    W' = W + s · (B A − B₀ A₀)                                 θ₀ = (A₀, B₀) stored, W untouched

B₀A₀ is a projection of W onto its first r QR directions, not its best rank-r approximation.
Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models", arXiv:2406.01775.
"""

import torch

PAPER = "Büyükakyüz, OLoRA, 2024 (arXiv:2406.01775)"
TRAINABLE = ("lora_A", "lora_B")
PEFT_INITS = ("olora",)  # PEFT's init_lora_weights="olora" rewrites the base to W − s·B₀A₀


def default_alpha(rank: int) -> float:
    return float(rank)


def init(w: torch.Tensor, opts: dict) -> dict:
    rank = opts["rank"]
    q, r = torch.linalg.qr(w.double())  # float64: cheap here and removes all doubt
    b0, a0 = q[..., :, :rank].float().contiguous(), r[..., :rank, :].float().contiguous()
    return {"lora_A": a0.clone(), "lora_B": b0.clone(), "lora_A0": a0, "lora_B0": b0}


def terms(t: dict, scaling: float, rank: int) -> list:
    return [(scaling, t["lora_B"], t["lora_A"]), (-scaling, t["lora_B0"], t["lora_A0"])]
