"""DoRA: a learned magnitude per output row on top of any low-rank method.

    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row        m₀ = ‖W‖_row   (length out)

The row norm is detached from the graph (DoRA §4.3), which keeps the backward cheap. In the
forward pass, with g = m / ‖W + ΔW‖_row and y₀ = W x + b the base output,

    y = y₀ + (g − 1) ⊙ (y₀ − b) + g ⊙ ΔW x

which is y₀ exactly at init (g = 1, ΔW = 0), in every dtype.
Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353.
"""

import torch

PAPER = "Liu et al., DoRA, ICML 2024 (arXiv:2402.09353)"
TRAINABLE = ("magnitude",)


def init(w: torch.Tensor) -> dict:
    m = row_norm(w)
    return {"magnitude": m, "magnitude0": m.clone()}


def row_norm(w: torch.Tensor) -> torch.Tensor:
    """‖W[n]‖ per output row; all-zero rows get 1 so that m / ‖·‖ is never 0/0 (peft#2049)."""
    n = torch.linalg.vector_norm(w.contiguous(), dim=-1)  # same reduction order for any layout
    return torch.where(n == 0, torch.ones_like(n), n)


def merged(w: torch.Tensor, delta: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row, all float32."""
    v = w + delta
    return v * (m / row_norm(v)).unsqueeze(-1)
