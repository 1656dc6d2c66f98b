"""VeRA: one pair of frozen random matrices for the whole model, and two scaling vectors per layer.

    ΔW = diag(b) B diag(d) A          A: r × in, B: out × r  (slices of shared A*: r × in_max,
                                       B*: out_max × r, frozen, kaiming-uniform from a seed)
    b₀ = 0 (out entries),  d₀ = 0.1 (r entries)                     (so ΔW = 0 bit for bit)

Hypothesis: random projections are expressive enough; adaptation only has to learn how strongly
each random direction is used (d) and how much each output channel takes (b) — gain control on a
shared random basis, with out + r parameters per module instead of r·(out + in).
Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024, arXiv:2310.11454.

- A*, B* are never stored: they are regenerated from ``projection_prng_key`` (default 0) exactly as
  PEFT does (one CPU ``torch.Generator`` seeded with the key draws A* then B*, each uniform in
  ±√3·√2/√fan_in with fan_in their second dimension), sized by the largest out and in over the
  targeted modules, and cached once per process. Each module slices A*[:, :in] and B*[:out, :].
- Per module: ``vera_lambda_b``, ``vera_lambda_d`` (trained) and ``vera_shared`` (frozen: the key
  as two 16-bit halves, out_max, in_max and the module's in: what regenerates its slices).
- r (``--rank``, default PEFT's 256) is one rank for every module (A*, B* are shared: no
  ``--rank-pattern``) and, as in PEFT, not bounded by the module dimensions.
- No α: ``--alpha``/``--rslora`` are refused. Dropout applies to the input (PEFT's vera_dropout).
- PEFT mapping: ``peft_type: VERA`` with ``save_projection: true`` (A*, B* written as
  ``base_model.vera_A``/``vera_B``, which equal PEFT's own regeneration from the key).
- inspect: the distribution of b and d per module.
"""

from __future__ import annotations

import math

import torch

from adaptedit.errors import UsageError
from adaptedit.methods.peft_vera import VERA as PEFT  # noqa: F401  (the PEFT mapping)

PAPER = "Kopiczko et al., VeRA, ICLR 2024 (arXiv:2310.11454)"
TRAINABLE = ("vera_lambda_b", "vera_lambda_d")
DEFAULT_RANK = 256  # PEFT's and the paper's
SCALED = False  # no α, no rsLoRA
OPTIONS = {"projection_prng_key": 0, "d_initial": 0.1}
LR = 4e-3  # the paper's instruction-tuning learning rate for VeRA (Llama, Table 8)
LR_SOURCE = "VeRA paper (instruction tuning, Llama 2; not re-checked against the table here)"

VECTORS = {"b": ("distribution", "b (output gains, 0 at init)"),
           "d": ("distribution", "d (random-direction strengths, 0.1 at init)")}

_SHARED: dict = {}


def default_alpha(rank: int) -> float:
    return 1.0  # unused: no scaling


def plan(targets, ranks: dict, options: dict, rank_given: bool) -> tuple[dict, dict]:
    """One rank for all modules; the shared matrices' size from the targets."""
    if len(set(ranks.values())) > 1:
        raise UsageError("--rank-pattern: VeRA shares A and B across modules, so every module has "
                         "the same rank; drop --rank-pattern")
    options = dict(options)
    options["vera_dims"] = [max(t.out_features for t in targets),
                            max(t.in_features for t in targets)]
    return ranks, options


def kaiming(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Uniform in ±√3·(√2/√fan_in), fan_in = shape[1]: PEFT's VeRA kaiming init, same operations."""
    std = math.sqrt(2) / math.sqrt(shape[1])
    bound = math.sqrt(3.0) * std
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared(key: int, rank: int, out_max: int, in_max: int, device=None):
    """(A*, B*) regenerated from the key (cached per process and device)."""
    k = (key, rank, out_max, in_max, str(device or "cpu"))
    if k not in _SHARED:
        cpu = (key, rank, out_max, in_max, "cpu")
        if cpu not in _SHARED:
            g = torch.Generator(device="cpu").manual_seed(key)
            a = kaiming((rank, in_max), g)
            _SHARED[cpu] = (a, kaiming((out_max, rank), g))
        _SHARED[k] = tuple(x.to(device) for x in _SHARED[cpu])
    return _SHARED[k]


def init(w: torch.Tensor, opts: dict) -> dict:
    b, out_f, in_f = w.shape
    rank, key = opts["rank"], int(opts.get("projection_prng_key", 0))
    out_max, in_max = opts["vera_dims"]
    code = torch.tensor([key >> 16, key & 0xFFFF, out_max, in_max, in_f], dtype=torch.float32)
    return {"vera_lambda_b": torch.zeros(b, out_f),
            "vera_lambda_d": torch.full((b, rank), float(opts.get("d_initial", 0.1))),
            "vera_shared": code.expand(b, 5).clone()}


def decode(t: dict) -> tuple[int, int, int, int]:
    """(key, out_max, in_max, in) of a module."""
    hi, lo, out_max, in_max, in_f = (int(v) for v in t["vera_shared"].reshape(-1).tolist())
    return (hi << 16) | lo, out_max, in_max, in_f


def slices(t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This module's A (r × in) and B (out × r)."""
    key, out_max, in_max, in_f = decode(t)
    lam_b, lam_d = t["vera_lambda_b"], t["vera_lambda_d"]
    a, b = shared(key, lam_d.shape[-1], out_max, in_max, lam_d.device)
    return a[:, :in_f], b[:lam_b.shape[-1], :]


def terms(t: dict, scaling: float, rank: int) -> list:
    a, b = slices(t)
    return [(1.0, t["vera_lambda_b"].unsqueeze(-1) * b, t["vera_lambda_d"].unsqueeze(-1) * a)]


def is_identity(t: dict) -> bool:
    """b = b₀ = 0 (d does not matter then)."""
    return not bool(torch.count_nonzero(t["vera_lambda_b"]))


def validate(t: dict, info) -> str | None:
    if "vera_shared" not in t or t["vera_shared"].numel() != 5:
        return "lacks vera_shared (the key and sizes of the shared matrices)"
    key, out_max, in_max, in_f = decode(t)
    out_f = info.shape[0]
    if in_f != info.shape[1] or out_f > out_max or in_f > in_max:
        return (f"vera_shared describes a {out_max}×{in_max} shared basis for in = {in_f}, "
                f"which does not fit the {out_f}×{info.shape[1]} module")
    if t["vera_lambda_b"].shape != (out_f,) or t["vera_lambda_d"].shape != (info.rank,):
        return (f"vera_lambda_b {tuple(t['vera_lambda_b'].shape)} / vera_lambda_d "
                f"{tuple(t['vera_lambda_d'].shape)} do not match out = {out_f}, r = {info.rank}")
    return None


def _stats(prefix: str, v: torch.Tensor) -> dict:
    v = v.double()
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_std": float(v.std()) if v.numel() > 1
            else 0.0, f"{prefix}_min": float(v.min()), f"{prefix}_max": float(v.max())}


def vectors(t: dict, info) -> dict:
    return {"b": t["vera_lambda_b"].double(), "d": t["vera_lambda_d"].double()}


def extras(t: dict, info, w, fro: float) -> dict:
    """The distribution of the output gains b and of the random-direction strengths d."""
    return {**_stats("vera_b", t["vera_lambda_b"]), **_stats("vera_d", t["vera_lambda_d"])}
