"""OFT: rotate the input space block by block, keeping the angles between W's neurons.

    W' = W Rᵀ,   R = diag(R₁, …, R_n) block-diagonal,   R_k = (I − Q_k)(I + Q_k)⁻¹   (Cayley)
    Q_k = skew(q_k): b × b skew-symmetric from its b(b−1)/2 upper-triangle entries q_k (trained)

Hypothesis: fine-tuning should keep the pairwise angles between neurons (the hyperspherical
energy) and only rotate them together. R is orthogonal for any q (Cayley), and R = I exactly at
q = 0 (the init), so W' = W bit for bit. The forward pass rotates the activations, y = W (R x̃)
per block of b inputs (O(tokens · in · b)), never forming W'.
Qiu et al., "Controlling Text-to-Image Diffusion by Orthogonal Finetuning", NeurIPS 2023,
arXiv:2306.07280; Cayley–Neumann (OFTv2): Qiu et al., 2025, arXiv:2506.19847.

- Block size b (``--block-size``): default PEFT's 32, lowered to the largest size that divides
  every targeted module's input width; an explicit size that does not divide a module is refused.
  Or ``--rank n``: n blocks per module (PEFT's ``r``), b = in / n.
- COFT (``--coft-eps ε``): each Q_k is projected onto ‖Q_k‖_F ≤ ε/√n before the Cayley transform
  (PEFT's ``coft``/``eps``); the projection is applied in the forward pass and passes gradients
  straight through, as PEFT's in-place projection does.
- PEFT mapping: ``peft_type: OFT`` with ``use_cayley_neumann: false`` (PEFT's exact Cayley; its
  default is a 5-term Neumann series, only approximately orthogonal). An imported Neumann adapter is
  computed the way PEFT computes it (``oft_neumann`` holds the number of terms).
- inspect: ‖R − I‖_F, the orthogonality error ‖RᵀR − I‖_F, and the rotation angles of R (the
  arguments θ of its eigenvalues e^{±iθ}, in degrees, largest first).
"""

from __future__ import annotations

import math

import torch

from adaptedit.errors import AdapteditError, UsageError
from adaptedit.methods.peft_orthogonal import OFT as PEFT  # noqa: F401  (the PEFT mapping)

PAPER = "Qiu et al., OFT, NeurIPS 2023 (arXiv:2306.07280)"
TRAINABLE = ("oft_R",)
DEFAULT_RANK = None  # the size comes from the block size
SCALED = False  # no α, no rsLoRA
PEFT_BLOCK = 32  # PEFT's default oft_block_size
OPTIONS = {"block_size": None, "coft_eps": None}
LR = 2e-4
ANGLES_MAX = 64


def default_alpha(rank: int) -> float:
    return 1.0  # unused: OFT has no scaling


def largest_block(sizes: list[int], cap: int = PEFT_BLOCK) -> int:
    """The largest b ≤ cap dividing every size."""
    g = 0
    for s in sizes:
        g = math.gcd(g, s)
    return max(b for b in range(1, min(cap, g) + 1) if g % b == 0)


def plan(targets, ranks: dict, options: dict, rank_given: bool) -> tuple[dict, dict]:
    """Blocks per module (stored as its rank) and the resolved options."""
    bs = options.get("block_size")
    if bs is not None and rank_given:
        raise UsageError("--block-size and --rank both set OFT's blocks (b = in / r); give one")
    if bs is not None and (bs != int(bs) or bs < 2):
        raise UsageError(f"--block-size {bs}: must be an integer ≥ 2")
    eps = options.get("coft_eps")
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise UsageError(f"--coft-eps {eps:g}: must be a positive number")
    out = {}
    if rank_given:
        missing = [t.name for t in targets if t.name not in ranks]
        if missing:
            raise UsageError(f"--rank-pattern leaves {missing[0]} without a block count; give "
                             "--rank too (OFT: blocks per module)")
        for t in targets:
            r = ranks[t.name]
            if t.in_features % r or t.in_features // r < 2:
                raise AdapteditError(f"--rank {r} (OFT blocks) does not divide the {t.in_features} "
                                     f"inputs of {t.name} into blocks of ≥ 2; choose a divisor "
                                     "or use --block-size")
            out[t.name] = r
        return out, {"block_size": None, "coft_eps": eps}
    if bs is None:
        bs = largest_block([t.in_features for t in targets])
        if bs < 2:
            raise AdapteditError("no block size ≥ 2 divides the input width of every targeted "
                                 "module; pass --block-size with fewer --targets")
    for t in targets:
        if t.in_features % bs:
            raise AdapteditError(f"--block-size {bs} does not divide the {t.in_features} inputs of "
                                 f"{t.name}; choose a divisor of {t.in_features} (or leave "
                                 "--block-size out: the largest fitting size is chosen)")
        out[t.name] = t.in_features // bs
    return out, {"block_size": int(bs), "coft_eps": eps}


def init(w: torch.Tensor, opts: dict) -> dict:
    b, _, in_f = w.shape
    n = opts["rank"]
    bs = in_f // n
    out = {"oft_R": torch.zeros(b, n, bs * (bs - 1) // 2)}
    if opts.get("coft_eps") is not None:
        out["oft_eps"] = torch.full((b, 1), float(opts["coft_eps"]))
    return out


def is_identity(t: dict) -> bool:
    return not bool(torch.count_nonzero(t["oft_R"]))


def validate(t: dict, info) -> str | None:
    q = t["oft_R"]
    n, in_f = info.rank, info.shape[1]
    bs = in_f // n if n and in_f % n == 0 else 0
    if q.dim() != 2 or q.shape[0] != n or q.shape[1] != bs * (bs - 1) // 2:
        return (f"oft_R is {'×'.join(map(str, q.shape))} but {n} blocks of the {in_f} inputs need "
                f"{n}×{bs * (bs - 1) // 2}")
    return None


def skew(q: torch.Tensor, bs: int) -> torch.Tensor:
    """(n, b(b−1)/2) upper-triangle entries → (n, b, b) skew-symmetric (PEFT's order)."""
    rows, cols = torch.triu_indices(bs, bs, 1, device=q.device)
    m = q.new_zeros(q.shape[0], bs, bs)
    m[:, rows, cols] = q
    return m - m.transpose(-1, -2)


def _project(s: torch.Tensor, eps: float) -> torch.Tensor:
    """COFT: each block onto ‖Q_k‖_F ≤ ε/√n (gradients pass straight through)."""
    bound = eps / math.sqrt(s.shape[0])
    norm = torch.linalg.matrix_norm(s.detach(), keepdim=True)
    proj = torch.where(norm <= bound, s.detach(), s.detach() * (bound / norm))
    return s + (proj - s.detach())


def rotation(t: dict, info) -> torch.Tensor:
    """The blocks R_k (n, b, b), float32."""
    q = t["oft_R"].float()
    bs = info.shape[1] // info.rank
    s = skew(q, bs)
    if "oft_eps" in t:
        s = _project(s, float(t["oft_eps"].reshape(-1)[0]))
    eye = torch.eye(bs, dtype=s.dtype, device=s.device)
    if "oft_neumann" in t:  # PEFT's Cayley–Neumann series: I + 2Q + 2Q² + … + Q^(k−1)
        k = int(t["oft_neumann"].reshape(-1)[0])
        r = eye.expand_as(s).clone()
        if k > 1:
            r = r + 2.0 * s
        if k > 2:
            p = s @ s
            r = r + 2.0 * p
            for _ in range(3, k - 1):
                p = p @ s
                r = r + 2.0 * p
            r = r + p @ s
        return r
    return torch.linalg.solve(eye + s, eye - s, left=False)  # R (I + Q) = I − Q


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The rotated input for row vectors x (…, in), block by block: x̃_k = x_k R_k (PEFT's layout)."""
    n, bs, _ = r.shape
    xs = x.reshape(*x.shape[:-1], n, bs)
    return torch.einsum("...nk,nkc->...nc", xs, r).reshape(x.shape)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    r = rotation(layer.tensors(), layer.info)
    return layer.base(rotate(x.to(r.dtype), r).to(x.dtype))


def delta_x(layer, x: torch.Tensor) -> torch.Tensor:
    """ΔW x = W (R̃ x − x) in float32 (for DoRA on top)."""
    r = rotation(layer.tensors(), layer.info)
    xf = x.to(r.dtype)
    return (rotate(xf, r) - xf) @ layer.weight().to(r.dtype).transpose(0, 1)


def merged(w: torch.Tensor, t: dict, info) -> torch.Tensor:
    """W' = W Rᵀ block by block, W'[:, k] = W[:, k] R_kᵀ (the forward's x_k ↦ x_k R_k, as a
    weight; PEFT's merge R Wᵀ, transposed)."""
    r = rotation(t, info)
    n, bs, _ = r.shape
    out_f = w.shape[0]
    return torch.einsum("onk,nck->onc", w.reshape(out_f, n, bs), r).reshape(out_f, -1)


def extras(t: dict, info, w, fro: float) -> dict:
    r = rotation(t, info).double()
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    angles = torch.linalg.eigvals(r).angle().abs().flatten() * (180 / math.pi)
    angles = torch.sort(angles, descending=True).values
    return {"r_minus_i": float(torch.linalg.matrix_norm(r - eye).square().sum().sqrt()),
            "orthogonality_error": float(torch.linalg.matrix_norm(
                r.transpose(-1, -2) @ r - eye).square().sum().sqrt()),
            "angle_max_deg": float(angles[0]) if angles.numel() else 0.0,
            "angle_mean_deg": float(angles.mean()) if angles.numel() else 0.0,
            "angles_deg": [float(a) for a in angles[:ANGLES_MAX]]}
