"""BOFT: rotate the input space by a butterfly product of block-diagonal rotations, and scale outputs.

    W' = diag(s) · W · Mᵀ,     M = B_{m−1} ⋯ B₁ B₀ applied to row vectors as x̃ = x M
    B_i = P_i · diag(R_{i,1}, …, R_{i,n}) · P_iᵀ,   R_{i,k} = (I − Q_{i,k})(I + Q_{i,k})⁻¹   (Cayley)

Q_{i,k}: b × b skew-symmetric from its b(b−1)/2 upper-triangle entries (trained, ``boft_R``: m × n ×
b(b−1)/2, n = in / b blocks); s: a trained scale per output (``boft_s``, PEFT's). P_i is the
butterfly permutation of factor i: inside each group of b·2^i inputs, the 2^(i+1) chunks of b/2
are reordered evens first, then odds, so that factor i's blocks pair inputs 2^i·b/2 apart; P₀ = I.

Hypothesis: as OFT, keep the angles between W's neurons (M is orthogonal), but reach a dense
rotation with few parameters: m sparse factors of n small blocks compose into a rotation that
mixes groups of b·2^(m−1) inputs (M is block-diagonal with blocks of that size), the butterfly
structure of the FFT. m = 1 is OFT (plus the scale s). Init q = 0, s = 1: every R = I exactly and
the scale is added as y + (s − 1)(y − bias) = y + 0, so the adapted model is the base bit for bit
in every dtype. The forward pass permutes and rotates the activations block-wise (O(tokens · in ·
b · m)), never forming M; merge applies the factors' transposes to W's rows.
Liu et al., "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", ICLR 2024,
arXiv:2311.06243.

- ``--block-size b`` (PEFT's ``boft_block_size``; default PEFT's 4, lowered to the largest size
  that fits every targeted module) and ``--butterfly-factors m`` (``boft_n_butterfly_factor``;
  default 2, the smallest that makes a butterfly). With m > 1, b must be even and every module's
  input width a multiple of b·2^(m−1), as PEFT requires; an explicit size that does not fit is
  refused naming the module. When the default m = 2 fits no even b, m = 1 is used (recorded).
- PEFT mapping: ``peft_type: BOFT`` (:mod:`adaptedit.methods.peft_boft`). PEFT computes m > 1 only
  with its CUDA extension (fbd_cuda); without it, PEFT forces m = 1, so export folds m > 1 factors
  into one factor of blocks of b·2^(m−1) (M's diagonal blocks: the same rotation).
- DoRA: refused (``DORA``): s already is a trained magnitude, which DoRA's m/‖V‖ would cancel.
- inspect: ‖M − I‖_F, ‖MᵀM − I‖_F and the rotation angles of M (the arguments of its
  eigenvalues, from its b·2^(m−1) diagonal blocks), as OFT; and the range of s.
"""

from __future__ import annotations

import functools
import math

import torch

from adaptedit.errors import AdapteditError, UsageError
from adaptedit.methods.oft import skew
from adaptedit.methods.peft_boft import BOFT as PEFT  # noqa: F401  (the PEFT mapping)

PAPER = "Liu et al., BOFT, ICLR 2024 (arXiv:2311.06243)"
TRAINABLE = ("boft_R", "boft_s")
DEFAULT_RANK = None  # the blocks come from the block size
RANKED = False
SCALED = False
PEFT_BLOCK = 4  # PEFT's default boft_block_size
DEFAULT_FACTORS = 2
OPTIONS = {"block_size": None, "butterfly_factors": None}
DORA = ("BOFT already trains a magnitude per output (s in W' = diag(s)·W·Mᵀ), which DoRA's "
        "m/‖V‖_row would cancel")
LR = 2e-4
ANGLES_MAX = 64


def default_alpha(rank: int) -> float:
    return 1.0  # unused: BOFT has no scaling


def fits(in_features: int, b: int, m: int) -> bool:
    """PEFT's constraints: b ≥ 2 divides in; with m > 1, b even and b·2^(m−1) divides in."""
    return b >= 2 and in_features % (b * 2 ** (m - 1)) == 0 and (m == 1 or b % 2 == 0)


def _largest(ins: list[int], m: int, cap: int) -> int | None:
    return next((b for b in range(cap, 1, -1) if all(fits(n, b, m) for n in ins)), None)


def plan(targets, ranks: dict, options: dict, rank_given: bool) -> tuple[dict, dict]:
    """Blocks per module (stored as its rank) and the resolved block size and factor count."""
    bs, m = options.get("block_size"), options.get("butterfly_factors")
    if bs is not None and (bs != int(bs) or bs < 2):
        raise UsageError(f"--block-size {bs}: must be an integer ≥ 2")
    if m is not None and (m != int(m) or m < 1):
        raise UsageError(f"--butterfly-factors {m}: must be an integer ≥ 1")
    ins = [t.in_features for t in targets]
    factors = int(m) if m is not None else DEFAULT_FACTORS
    if bs is not None:
        bs = int(bs)
        for t in targets:
            if not fits(t.in_features, bs, factors):
                need = bs * 2 ** (factors - 1)
                odd = " and an even block size" if factors > 1 and bs % 2 else ""
                raise AdapteditError(
                    f"--block-size {bs} with {factors} butterfly factor(s) does not fit the "
                    f"{t.in_features} inputs of {t.name}: BOFT needs a multiple of b·2^(m−1) = "
                    f"{need}{odd}; choose another --block-size"
                    + (" or fewer --butterfly-factors" if factors > 1 else "")
                    + " (or leave --block-size out: the largest fitting size is chosen)")
    else:
        bs = _largest(ins, factors, PEFT_BLOCK)
        if bs is None and m is None:  # the default butterfly does not fit: OFT's block-diagonal
            factors, bs = 1, _largest(ins, 1, PEFT_BLOCK)
        if bs is None:
            widths = ", ".join(map(str, sorted(set(ins))))
            raise AdapteditError(
                f"no block size ≥ 2 fits {factors} butterfly factor(s) on every targeted module "
                f"(input widths {widths}); "
                + ("lower --butterfly-factors or " if factors > 1 else "")
                + "narrow --targets")
    return ({t.name: t.in_features // bs for t in targets},
            {"block_size": bs, "butterfly_factors": factors})


def init(w: torch.Tensor, opts: dict) -> dict:
    b, out_f, in_f = w.shape
    n = opts["rank"]
    bs = in_f // n
    return {"boft_R": torch.zeros(b, opts["butterfly_factors"], n, bs * (bs - 1) // 2),
            "boft_s": torch.ones(b, out_f)}


def is_identity(t: dict) -> bool:
    return not bool(torch.count_nonzero(t["boft_R"])) and bool((t["boft_s"] == 1).all())


def validate(t: dict, info) -> str | None:
    q, s = t["boft_R"], t["boft_s"]
    out_f, in_f = info.shape
    n = info.rank
    bs = in_f // n if n and in_f % n == 0 else 0
    m = q.shape[0] if q.dim() == 3 else 0
    if q.dim() != 3 or m < 1 or q.shape[1] != n or q.shape[2] != bs * (bs - 1) // 2:
        return (f"boft_R is {'×'.join(map(str, q.shape))} but {n} blocks of the {in_f} inputs "
                f"need (factors)×{n}×{bs * (bs - 1) // 2}")
    if not fits(in_f, bs, m):
        return f"{m} butterfly factors of blocks of {bs} do not fit its {in_f} inputs"
    if tuple(s.shape) != (out_f,):
        return f"boft_s is {'×'.join(map(str, s.shape))} but the module has {out_f} outputs"
    return None


@functools.lru_cache(maxsize=64)
def _perm(n: int, b: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor i's butterfly permutation p (P[j, p[j]] = 1) and its inverse, over n inputs: inside
    each group of b·2^i, the chunks of b/2 in the order evens, then odds."""
    p = torch.arange(n).view(n // (b << i), 1 << i, 2, b // 2).transpose(1, 2).reshape(-1)
    return p, torch.argsort(p)


def blocks(t: dict, info) -> torch.Tensor:
    """The rotations R_{i,k}, (m, n, b, b) float32 (the Cayley transform of each block)."""
    q = t["boft_R"].float()
    m, n, _ = q.shape
    bs = info.shape[1] // info.rank
    s = skew(q.reshape(m * n, -1), bs)
    eye = torch.eye(bs, dtype=s.dtype, device=s.device)
    return torch.linalg.solve(eye + s, eye - s, left=False).reshape(m, n, bs, bs)


def _factor(z: torch.Tensor, r: torch.Tensor, i: int) -> torch.Tensor:
    """z ↦ z P_i diag(r) P_iᵀ for row vectors z (…, in); r: (n, b, b)."""
    n, bs, _ = r.shape
    if i:
        p, inv = _perm(z.shape[-1], bs, i)
        z = z[..., inv.to(z.device)]
    zs = z.reshape(*z.shape[:-1], n, bs)
    z = torch.einsum("...nk,nkc->...nc", zs, r).reshape(z.shape)
    return z[..., p.to(z.device)] if i else z


def rotate(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x ↦ x M = x B_{m−1} ⋯ B₀ for row vectors x (…, in) (PEFT's order: factor m−1 first)."""
    for i in range(r.shape[0] - 1, -1, -1):
        x = _factor(x, r[i], i)
    return x


def _scale(y: torch.Tensor, bias, s: torch.Tensor) -> torch.Tensor:
    """s ⊙ (y − bias) + bias, written y + (s − 1)(y − bias) so that s = 1 adds exactly 0."""
    yf = y.float()
    yb = yf - bias.float() if bias is not None else yf
    return (yf + (s - 1.0) * yb).to(y.dtype)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    t = layer.tensors()
    r = blocks(t, layer.info)
    y = layer.base(rotate(x.to(r.dtype), r).to(x.dtype))
    return _scale(y, getattr(layer.base, "bias", None), t["boft_s"].float())


def delta_x(layer, x: torch.Tensor) -> torch.Tensor:
    """ΔW x = s ⊙ (W x̃) − W x in float32."""
    t = layer.tensors()
    r = blocks(t, layer.info)
    w = layer.weight().float().transpose(0, 1)
    xf = x.float()
    return (rotate(xf, r) @ w) * t["boft_s"].float() - xf @ w


def merged(w: torch.Tensor, t: dict, info) -> torch.Tensor:
    """W' = diag(s) W Mᵀ: each row w ↦ w B₀ᵀ B₁ᵀ ⋯ B_{m−1}ᵀ (the factors' transposed blocks, factor
    0 first), then scaled by s."""
    r = blocks(t, info).transpose(-1, -2)
    y = w.float()
    for i in range(r.shape[0]):
        y = _factor(y, r[i], i)
    return y * t["boft_s"].float().unsqueeze(1)


def dense_blocks(t: dict, info) -> torch.Tensor:
    """M's diagonal blocks (groups of b·2^(m−1) inputs), (groups, L, L) float64: the factors'
    permutations and blocks never leave a group, so M is block-diagonal with these."""
    r = blocks(t, info).double()
    m, _, bs, _ = r.shape
    size = bs << (m - 1)
    groups = info.shape[1] // size
    rows = torch.eye(size, dtype=r.dtype).repeat(1, groups)  # e_j in every group at once
    return rotate(rows, r).view(size, groups, size).transpose(0, 1)


def extras(t: dict, info, w, fro: float) -> dict:
    mb = dense_blocks(t, info)
    eye = torch.eye(mb.shape[-1], dtype=mb.dtype)
    angles = torch.linalg.eigvals(mb).angle().abs().flatten() * (180 / math.pi)
    angles = torch.sort(angles, descending=True).values
    s = t["boft_s"].double()
    return {"r_minus_i": float(torch.linalg.matrix_norm(mb - eye).square().sum().sqrt()),
            "orthogonality_error": float(torch.linalg.matrix_norm(
                mb.transpose(-1, -2) @ mb - eye).square().sum().sqrt()),
            "angle_max_deg": float(angles[0]) if angles.numel() else 0.0,
            "angle_mean_deg": float(angles.mean()) if angles.numel() else 0.0,
            "angles_deg": [float(a) for a in angles[:ANGLES_MAX]],
            "scale_min": float(s.min()), "scale_max": float(s.max())}
