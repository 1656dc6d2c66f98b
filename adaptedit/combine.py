"""Combining the dense updates ΔWᵢ of several adapters on one tensor (pure tensor functions).

The conventions are PEFT's (``peft.utils.merge_utils``, used by ``add_weighted_adapter``'s
``ties_svd`` / ``dare_linear_svd`` / ``dare_ties_svd`` on the dense ΔW before its SVD truncation), so
a user comparing with PEFT gets the same tensor (tested against PEFT's functions):

    linear       Σ wᵢ ΔWᵢ
    ties         τᵢ = trim(ΔWᵢ): keep the ⌊density·n⌋ entries of largest |·| (torch.topk), zero
                 the rest. Sign per entry: σ = +1 where Σᵢ τᵢ ≥ 0 (unweighted sum; 0 → +1), else −1.
                 Result: Σᵢ wᵢ τᵢ [sign τᵢ = σ] / max(1, #{i : sign τᵢ = σ})
                 (Yadav et al., "TIES-Merging", NeurIPS 2023, arXiv:2306.01708)
    dare_linear  τᵢ = ΔWᵢ ⊙ mᵢ / density, mᵢ ~ Bernoulli(density) (seeded per tensor and adapter);
                 then linear (Yu et al., "Language Models are Super Mario", ICML 2024,
                 arXiv:2311.03099)
    dare_ties    the same drop-and-rescale, then TIES' sign election and disjoint mean

density ≥ 1 keeps every entry (as PEFT). An adapter that does not touch the tensor (None) takes no
part, as in PEFT, where only the adapters holding the module are combined. One adapter is allowed:
TIES then keeps its top entries, DARE drops and rescales.
"""

from __future__ import annotations

import zlib

import torch

COMBINE = ("linear", "ties", "dare_linear", "dare_ties")


def generator(seed: int, key: str, i: int) -> torch.Generator:
    """One generator per (tensor, adapter): the drop pattern does not depend on the tensor order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode()) * 31 + i)
                                         % (2 ** 63))


def trim(d: torch.Tensor, density: float) -> torch.Tensor:
    """TIES 'trim': keep the ⌊density·n⌋ entries of largest magnitude (PEFT's magnitude pruning)."""
    if density >= 1.0:
        return d
    k = int(density * d.numel())
    mask = torch.zeros(d.numel(), dtype=d.dtype)
    mask[torch.topk(d.abs().reshape(-1), k=k, largest=True).indices] = 1
    return d * mask.reshape(d.shape)


def dare(d: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 − density, rescale the kept ones by 1/density."""
    if density >= 1.0:
        return d
    keep = (torch.rand(d.shape, generator=gen) < density).to(d.dtype)
    return d * keep / density


def disjoint_merge(parts: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES: σ = sign of the unweighted Σ τᵢ (0 → +), mean of the weighted entries agreeing with σ."""
    total = parts[0].clone()
    for t in parts[1:]:
        total += t
    sigma = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    del total
    acc = torch.zeros_like(sigma)
    count = torch.zeros_like(sigma)
    for t, w in zip(parts, weights):
        agree = torch.sign(t) == sigma
        acc += (t * w) * agree
        count += agree
    return acc / count.clamp_min(1.0)


def combine(deltas: list[torch.Tensor | None], weights: list[float], how: str, density: float,
            seed: int, key: str) -> torch.Tensor | None:
    """Combine the dense float32 updates of one tensor (None: that adapter does not touch it)."""
    parts, ws = [], []
    for i, (d, w) in enumerate(zip(deltas, weights)):
        if d is None:
            continue
        if how == "ties":
            d = trim(d, density)
        elif how in ("dare_linear", "dare_ties"):
            d = dare(d, density, generator(seed, key, i))
        parts.append(d)
        ws.append(float(w))
    if not parts:
        return None
    if how in ("ties", "dare_ties"):
        return disjoint_merge(parts, ws)
    out = parts[0] * ws[0] if ws[0] != 1.0 else parts[0]
    for p, w in zip(parts[1:], ws[1:]):
        out = out + (p * w if w != 1.0 else p)
    return out
