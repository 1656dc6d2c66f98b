"""PiSSA and MiLoRA: start from W's own singular triplets.

    W = U Σ Vᵀ;  B₀ = U_r √(Σ_r / s),  A₀ = √(Σ_r / s) V_rᵀ       (so s·B₀A₀ = U_r Σ_r V_rᵀ)
    W' = W + s · (B A − B₀ A₀)                                       θ₀ = (A₀, B₀) stored

This is the paper's residual model W_res = W − s·B₀A₀ without ever writing W_res: the base stays
untouched and the forward pass subtracts s·B₀(A₀x).

- PiSSA (principal, top r): the principal directions are where to adapt.
  Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of LLMs",
  NeurIPS 2024, arXiv:2404.02948. Paper defaults: α = r, lr 2e-5, dropout 0.
- MiLoRA (minor, bottom r): adapt where W carries the least, keep the principal knowledge.
  Wang et al., "MiLoRA: Harnessing Minor Singular Components for Parameter-Efficient LLM
  Finetuning", NAACL 2025, arXiv:2406.09044. Paper defaults: α = 2r, lr 3e-4.

SVD: ``full`` is an exact float64 SVD (the top-r subspace is sensitive when σ_r ≈ σ_{r+1}; float32
leaves ~1e-4 relative error there), batched over matrices of equal shape; ``randomized`` is a seeded Halko sketch with oversampling and ``niter`` power iterations (top
triplets only, so MiLoRA always uses the exact SVD).
"""

import torch

from adaptedit.linalg import extreme_svd, randomized_svd

TRAINABLE = ("lora_A", "lora_B")
# PEFT's init_lora_weights for PiSSA: "pissa" (float32 SVD) and "pissa_niter_K" (randomized SVD);
# both rewrite the base to W − s·B₀A₀ (see adaptedit.methods.peft_init_rewrites_base)
PEFT_INITS = ("pissa",)


class SVDMethod:
    TRAINABLE = TRAINABLE

    def __init__(self, name: str, minor: bool, paper: str, alpha_factor: float, lr: float,
                 lr_source: str):
        self.name, self.minor, self.PAPER, self._alpha = name, minor, paper, alpha_factor
        self.LR, self.LR_SOURCE = lr, lr_source
        self.SVD = "full" if minor else "any"  # the bottom triplets need the exact SVD

    def default_alpha(self, rank: int) -> float:
        return self._alpha * rank

    def init(self, w: torch.Tensor, opts: dict) -> dict:
        rank, scaling = opts["rank"], opts["scaling"]
        kind = opts.get("svd", "full")
        if kind == "randomized" and not self.minor:
            u, s, vh = randomized_svd(w, rank, niter=opts.get("niter", 4),
                                      oversample=opts.get("oversample", 8),
                                      generator=opts["generator"])
        else:
            u, s, vh = extreme_svd(w, rank, self.minor)  # shared within linalg.shared_svd()
        root = torch.sqrt(s / scaling)  # (b, r)
        b0 = (u * root.unsqueeze(-2)).float().contiguous()
        a0 = (root.unsqueeze(-1) * vh).float().contiguous()
        return {"lora_A": a0.clone(), "lora_B": b0.clone(), "lora_A0": a0, "lora_B0": b0,
                "_s": s.float()}

    @staticmethod
    def terms(t: dict, scaling: float, rank: int) -> list:
        return [(scaling, t["lora_B"], t["lora_A"]), (-scaling, t["lora_B0"], t["lora_A0"])]


PISSA = SVDMethod("pissa", False, "Meng et al., PiSSA, NeurIPS 2024 (arXiv:2404.02948)", 1.0, 2e-5,
                  "PiSSA paper")
MILORA = SVDMethod("milora", True, "Wang et al., MiLoRA, NAACL 2025 (arXiv:2406.09044)", 2.0, 3e-4,
                   "MiLoRA paper")
