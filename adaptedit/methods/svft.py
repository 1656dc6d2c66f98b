"""SVFT (plain): move only W's own singular values.

    W = U Σ Vᵀ;   ΔW = U_r diag(m) V_rᵀ        U_r, V_r: W's top-r singular vectors (frozen)
    m₀ = 0 (r entries)                                                  (so ΔW = 0 bit for bit)

Hypothesis: the update lives in W's own singular basis — fine-tuning re-weights the directions W
already has instead of adding new ones. ``plain`` is the paper's diagonal M: each learned entry
is the change ΔΣ of one singular value.
Lingam et al., "SVFT: Parameter-Efficient Fine-Tuning with Singular Vectors", NeurIPS 2024,
arXiv:2405.19597.

- r (``--rank``, default 16): the number of top singular triplets; ``--rank min(out, in)`` is the
  paper's full basis. U_r and V_rᵀ are stored in float32 (r·(out + in) frozen numbers per module)
  next to σ_r (``svft_s``, for inspect), from the exact float64 SVD PiSSA uses
  (:func:`adaptedit.linalg.extreme_svd`, shared within ``linalg.shared_svd``).
- Forward: factored, y = W x + U_r (m ⊙ (V_rᵀ x)), added in float32 and rounded once; no dense ΔW
  is formed during training.
- No PEFT form: PEFT has no SVFT adapter type (and a LoRA export would hide the method); merge
  is the deployment path.
- inspect: how far the learned ΔΣ moved (mean and max |m|, ‖m‖/‖σ_r‖) and which singular index
  moved most.
- Not here yet: the paper's ``banded`` and ``random`` off-diagonal variants.
"""

from __future__ import annotations

import torch

from adaptedit.linalg import extreme_svd

PAPER = "Lingam et al., SVFT, NeurIPS 2024 (arXiv:2405.19597)"
TRAINABLE = ("svft_m",)
SVD = "full"  # the exact float64 SVD (PiSSA's), cached within linalg.shared_svd
SCALED = False  # no α, no rsLoRA
LR = 1e-3  # not tuned here; the paper sweeps per task
PEFT = ("PEFT has no SVFT adapter type (and an exact LoRA of U diag(m) Vᵀ would not train as "
        "SVFT); deploy with `adaptedit merge`")


def default_alpha(rank: int) -> float:
    return 1.0  # unused: no scaling


def init(w: torch.Tensor, opts: dict) -> dict:
    u, s, vh = extreme_svd(w, opts["rank"], False)
    return {"svft_m": torch.zeros(s.shape, dtype=torch.float32),
            "svft_U": u.float().contiguous(), "svft_V": vh.float().contiguous(),
            "svft_s": s.float().contiguous()}


def terms(t: dict, scaling: float, rank: int) -> list:
    return [(1.0, t["svft_U"] * t["svft_m"].unsqueeze(-2), t["svft_V"])]


def is_identity(t: dict) -> bool:
    return not bool(torch.count_nonzero(t["svft_m"]))


def validate(t: dict, info) -> str | None:
    out_f, in_f = info.shape
    r = info.rank
    want = {"svft_m": (r,), "svft_U": (out_f, r), "svft_V": (r, in_f)}
    for k, shape in want.items():
        if k not in t or tuple(t[k].shape) != shape:
            got = tuple(t[k].shape) if k in t else "missing"
            return f"{k} is {got}; a {out_f}×{in_f} module at rank {r} needs {shape}"
    return None


def extras(t: dict, info, w, fro: float) -> dict:
    """The learned ΔΣ: its size, relative to σ_r, and the singular index that moved most."""
    m = t["svft_m"].double()
    out = {"svft_dsigma_mean_abs": float(m.abs().mean()),
           "svft_dsigma_max_abs": float(m.abs().max()),
           "svft_top_index": int(m.abs().argmax())}
    if "svft_s" in t:
        s = t["svft_s"].double()
        out["svft_dsigma_rel"] = float(m.norm() / s.norm()) if s.norm() > 0 else None
    return out
