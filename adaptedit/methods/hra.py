"""HRA: adapt W by a chain of r Householder reflections of its input space.

    W' = W H,   H = Π_{i=1..r} (I − 2 uᵢuᵢᵀ / ‖uᵢ‖²)        uᵢ ∈ R^in trained,  U = [u₁ … u_r]

Hypothesis: like OFT, keep the angles between W's neurons (H is orthogonal), with a rank-r
parametrisation: H − I has rank ≤ r, so ΔW = W(H − I) has rank ≤ r too (a bridge between OFT and
LoRA). Init pairs equal vectors, u₂ₖ = u₂ₖ₊₁ (kaiming-uniform halves, as the paper and PEFT), so
each pair's product is I; r must be even. Each pair is applied as one step,

    H(u)H(v) x = x + d,   d = 4 (uᵀv / ‖u‖²) u (vᵀx / ‖v‖²) − 2 u (uᵀx / ‖u‖²) − 2 v (vᵀx / ‖v‖²)

written so that d = 4p − 2p − 2p = 0 exactly when u = v: the adapted model is the base bit for bit
at init in every dtype. The forward pass reflects the activations (O(tokens · in · r)); merge
applies the reflections to W's rows, never forming H. In training the chain is checkpointed:
autograd keeps x and U, and the backward pass recomputes the r/2 intermediate activations (one
extra O(tokens · in · r) pass) instead of keeping two activation-sized tensors per pair.
Optional orthogonality regulariser λ‖I − ÛᵀÛ‖²_F (Û: U with unit columns), ``--hra-lambda``,
added to the training loss (0 = off; the paper's default is 0 for LLMs, 1e-4 … 1e-5 elsewhere).
Yuan et al., "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", NeurIPS 2024, arXiv:2405.17484.

PEFT mapping: ``peft_type: HRA``, ``hra_u`` (in × r), ``apply_GS: false`` (PEFT normalises each
uᵢ and multiplies the reflections densely: the same H up to float rounding).
inspect: ‖H − I‖_F, ‖I − ÛᵀÛ‖_F, and H's rotation angles (the arguments of its eigenvalues).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from adaptedit.errors import AdapteditError, UsageError
from adaptedit.methods.peft_orthogonal import HRA as PEFT  # noqa: F401  (the PEFT mapping)

PAPER = "Yuan et al., HRA, NeurIPS 2024 (arXiv:2405.17484)"
TRAINABLE = ("hra_u",)
DEFAULT_RANK = 8  # PEFT's default r
SCALED = False
OPTIONS = {"hra_lambda": None}
LR = 2e-4
ANGLES_MAX = 64


def default_alpha(rank: int) -> float:
    return 1.0  # unused: HRA has no scaling


def plan(targets, ranks: dict, options: dict, rank_given: bool) -> tuple[dict, dict]:
    lam = options.get("hra_lambda")
    if lam is not None and not (math.isfinite(lam) and lam >= 0):
        raise UsageError(f"--hra-lambda {lam:g}: must be a number ≥ 0")
    for t in targets:
        r = ranks[t.name]
        if r % 2:
            raise UsageError(f"rank {r} for {t.name}: HRA's identity init pairs equal reflections, "
                             "so the rank must be even")
        if r > t.in_features:
            raise AdapteditError(f"rank {r} for {t.name} exceeds its {t.in_features} inputs; lower "
                                 "--rank")
    return ranks, {"hra_lambda": lam}


def init(w: torch.Tensor, opts: dict) -> dict:
    b, _, in_f = w.shape
    r = opts["rank"]
    bound = 1.0 / math.sqrt(r // 2)  # kaiming_uniform_(a=√5) on PEFT's (in × r/2) half
    half = torch.rand(b, in_f, r // 2, generator=opts["generator"]) * (2 * bound) - bound
    out = {"hra_u": torch.repeat_interleave(half, 2, dim=-1)}
    if opts.get("hra_lambda"):
        out["hra_lambda"] = torch.full((b, 1), float(opts["hra_lambda"]))
    return out


def is_identity(t: dict) -> bool:
    u = t["hra_u"]
    return bool(torch.equal(u[:, 0::2], u[:, 1::2]))


def validate(t: dict, info) -> str | None:
    u = t["hra_u"]
    if u.dim() != 2 or u.shape[0] != info.shape[1] or u.shape[1] != info.rank or info.rank % 2:
        return (f"hra_u is {'×'.join(map(str, u.shape))} but {info.rank} reflections of the "
                f"{info.shape[1]} inputs need {info.shape[1]}×{info.rank} (an even rank)")
    return None


def pair(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """H(u) H(v) x for row vectors x (…, in); exactly x when u and v are equal (see above)."""
    nu, nv = (u * u).sum(), (v * v).sum()
    c = (u * v).sum() / nu
    su, sv = (x @ u).unsqueeze(-1) / nu, (x @ v).unsqueeze(-1) / nv
    return x + ((4.0 * c) * (sv * u) - 2.0 * (su * u) - 2.0 * (sv * v))


def reflect(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """H x = H(u₁)(H(u₂)(… H(u_r) x)) for row vectors x (…, in), pair by pair."""
    for k in range(u.shape[1] // 2 - 1, -1, -1):
        x = pair(x, u[:, 2 * k], u[:, 2 * k + 1])
    return x


def reflect_lean(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`reflect`, keeping only x and u for the backward pass (which recomputes the chain).
    Same values and gradients, bit for bit; without it autograd keeps each pair's input and its
    4c·(sv u) product: r activation-sized tensors per module (HRA r = 8 on SmolLM2 at batch 8 × 128:
    +29% peak memory over PEFT, which multiplies W by a dense H instead)."""
    if torch.is_grad_enabled() and (x.requires_grad or u.requires_grad):
        return checkpoint(reflect, x, u, use_reentrant=False, preserve_rng_state=False)
    return reflect(x, u)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    u = layer.tensors()["hra_u"]
    return layer.base(reflect_lean(x.to(u.dtype), u).to(x.dtype))


def delta_x(layer, x: torch.Tensor) -> torch.Tensor:
    """ΔW x = W (H x − x) in float32 (for DoRA on top)."""
    u = layer.tensors()["hra_u"].float()
    xf = x.float()
    return (reflect_lean(xf, u) - xf) @ layer.weight().float().transpose(0, 1)


def merged(w: torch.Tensor, t: dict, info) -> torch.Tensor:
    """W' = W H: each row w ↦ Hᵀ w = H(u_r)…H(u₁) w, i.e. the pairs in order with u, v swapped."""
    u = t["hra_u"]
    u = u if u.dtype == torch.float64 else u.float()
    y = w.to(u.dtype)
    for k in range(u.shape[1] // 2):
        y = pair(y, u[:, 2 * k + 1], u[:, 2 * k])
    return y


def _unit(u: torch.Tensor) -> torch.Tensor:
    return u / u.norm(dim=0, keepdim=True)


def penalty(t: dict, info):
    """λ‖I − ÛᵀÛ‖²_F, or None when λ is not set."""
    if "hra_lambda" not in t:
        return None
    un = _unit(t["hra_u"])
    g = un.transpose(0, 1) @ un
    return t["hra_lambda"].reshape(()) * (torch.eye(g.shape[0], device=g.device) - g).square().sum()


def extras(t: dict, info, w, fro: float) -> dict:
    """‖H − I‖_F, ‖I − ÛᵀÛ‖_F and H's rotation angles. H is I outside span(U), so its nontrivial
    eigenvalues are those of QᵀHQ with Q an orthonormal basis of span(U) (r × r, cheap)."""
    u = t["hra_u"].double()
    q = torch.linalg.qr(u).Q  # (in × r)
    hq = reflect(q.transpose(0, 1), u).transpose(0, 1)  # H Q
    small = q.transpose(0, 1) @ hq
    eye = torch.eye(small.shape[0], dtype=small.dtype)
    angles = torch.linalg.eigvals(small).angle().abs() * (180 / math.pi)
    angles = torch.sort(angles, descending=True).values
    un = _unit(u)
    return {"r_minus_i": float(torch.linalg.matrix_norm(hq - q)),  # ‖(H − I)Q‖ = ‖H − I‖
            "reflection_orthogonality": float(torch.linalg.matrix_norm(
                eye - un.transpose(0, 1) @ un)),
            "angle_max_deg": float(angles[0]),
            "angle_mean_deg": float(angles.mean()),
            "angles_deg": [float(a) for a in angles[:ANGLES_MAX]]}
