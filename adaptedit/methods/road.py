"""RoAd (variant 1): rotate and scale pairs of output channels.

    y = R (W x) + b,   W' = R W,   R block-diagonal: for each pair (i, j) of outputs
        [y_i']   [α cos θ   −α sin θ] [y_i]
        [y_j'] = [α sin θ    α cos θ] [y_j]
    θ₀ = 0, α₀ = 1                                                       (so R = I, W' = W bit for bit)

The outputs are cut into groups of g (``group_size``, default 64 as PEFT); in each group element
k is paired with element k + g/2, one (θ, α) per pair: out/2 angles and out/2 scales per module.
Hypothesis: adaptation is gain control plus small rotations of what a layer writes — a 2-D
rotation-and-scale of output pairs per channel pair.
Liao & Monz, "2D Rotary Adaptation: Efficient Fine-Tuning, Efficient Batching and
Composability", 2024, arXiv:2409.00119.

- g: ``group_size`` when given (even, dividing every targeted module's output width, else refused);
  by default PEFT's 64, lowered to the largest even size ≤ 64 dividing every targeted module's
  output width (recorded in adaptedit.json and per module as ``road_group``); refused when none
  exists.
- The bias is not rotated (W' = R W is the whole update, so merge is exact). PEFT rotates the
  output including the bias and supports ``nn.Linear`` only: an adapter with a biased module or a
  GPT-2 Conv1D module has no exact PEFT form and its export is refused (it merges).
- Forward: y₀·c + rot(y₀)·s in float32, rounded once (PEFT's operations: bit-identical when the
  module has no bias), with c = α cos θ, s = α sin θ; with a bias y₀ + (R(y₀ − b) − (y₀ − b)).
- inspect: the scales α and the angles |θ| (degrees) per module.
"""

from __future__ import annotations

import math

import torch

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_road import ROAD as PEFT  # noqa: F401  (the PEFT mapping)

PAPER = "Liao & Monz, RoAd, 2024 (arXiv:2409.00119)"
TRAINABLE = ("road_theta", "road_alpha")
OPTIONS = {"group_size": None}  # None: PEFT's 64, or the largest even size dividing every module
PEFT_GROUP = 64
DEFAULT_RANK = 1  # recorded as each module's rank: RoAd has none
RANKED = False
SCALED = False
DROPOUT = False  # the rotation acts on the output: no input path to drop
VECTORS = {"alpha": ("distribution", "α (pair scales, 1 at init)"),
           "angle_deg": ("distribution", "|θ| (pair rotation angles, degrees)")}
LR = 1e-3  # PEFT's RoAd docs: "a higher learning rate compared to LoRA … around 1e-3"
LR_SOURCE = "PEFT RoAd docs (around 1e-3)"


def default_alpha(rank: int) -> float:
    return 1.0  # unused: no scaling


def plan(targets, ranks: dict, options: dict, rank_given: bool) -> tuple[dict, dict]:
    g = 0
    for t in targets:
        g = math.gcd(g, t.out_features)
    given = options.get("group_size")
    if given is not None:
        if not (isinstance(given, int) and given >= 2 and given % 2 == 0 and g % given == 0):
            raise AdapteditError(f"--group-size {given}: RoAd pairs output channels in groups of an "
                                 f"even size that divides every targeted module's output width "
                                 f"(their gcd is {g}); choose an even divisor of {g}")
        return {n: 1 for n in ranks}, {**options, "group_size": given}
    sizes = [s for s in range(2, min(PEFT_GROUP, g) + 1, 2) if g % s == 0]
    if not sizes:
        raise AdapteditError(f"RoAd pairs output channels in groups of an even size that divides "
                             f"every targeted module's output width; their gcd is {g}, so none "
                             "exists: choose other --targets")
    return {n: 1 for n in ranks}, {**options, "group_size": max(sizes)}


def init(w: torch.Tensor, opts: dict) -> dict:
    b, out_f, _ = w.shape
    g = int(opts["group_size"])
    return {"road_theta": torch.zeros(b, out_f // 2), "road_alpha": torch.ones(b, out_f // 2),
            "road_group": torch.full((b, 1), float(g))}


def group(t: dict) -> int:
    return int(t["road_group"].reshape(-1)[0])


def cols(t: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """c = α cos θ and s = α sin θ per output (each pair's value on both of its elements)."""
    half = group(t) // 2
    theta = t["road_theta"].reshape(-1, half).repeat_interleave(2, dim=0).flatten()
    alpha = t["road_alpha"].reshape(-1, half).repeat_interleave(2, dim=0).flatten()
    return alpha * theta.cos(), alpha * theta.sin()


def rotate(t: dict, y: torch.Tensor) -> torch.Tensor:
    """R y along the last dimension (PEFT's operations, in the dtype of y)."""
    c, s = cols(t)
    half = group(t) // 2
    grouped = y.reshape(-1, 2, half)
    rot = torch.stack((-grouped[:, 1, :], grouped[:, 0, :]), dim=1).reshape(y.shape)
    return y * c + rot * s


def merged(w: torch.Tensor, t: dict, info) -> torch.Tensor:
    """W' = R W: every column of W rotated as an output vector."""
    return rotate(t, w.float().transpose(0, 1).contiguous()).transpose(0, 1).contiguous()


def is_identity(t: dict) -> bool:
    return bool((t["road_theta"] == 0).all() and (t["road_alpha"] == 1).all())


def _wx(layer, y: torch.Tensor) -> torch.Tensor:
    bias = getattr(layer.base, "bias", None)
    return y.float() - bias.float() if bias is not None else y.float()


def delta_x(layer, x: torch.Tensor) -> torch.Tensor:
    yw = _wx(layer, layer.base(x))
    return rotate(layer.tensors(), yw) - yw


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    y = layer.base(x)
    t = layer.tensors()
    if getattr(layer.base, "bias", None) is None:
        return rotate(t, y.float()).to(y.dtype)  # PEFT's operation
    yw = _wx(layer, y)
    return (y.float() + (rotate(t, yw) - yw)).to(y.dtype)  # the bias stays unrotated


def validate(t: dict, info) -> str | None:
    if "road_group" not in t:
        return "lacks road_group (the group size)"
    g, out_f = group(t), info.shape[0]
    if g < 2 or g % 2 or out_f % g:
        return f"group size {g} does not split the {out_f} outputs into even groups"
    for k in TRAINABLE:
        if tuple(t[k].shape) != (out_f // 2,):
            return f"{k} has shape {tuple(t[k].shape)}; {out_f} outputs need ({out_f // 2},)"
    return None


def vectors(t: dict, info) -> dict:
    return {"alpha": t["road_alpha"].double(),
            "angle_deg": t["road_theta"].double().abs() * (180 / math.pi)}


def extras(t: dict, info, w, fro: float) -> dict:
    """The pairs' scales α and rotation angles |θ| (degrees)."""
    a, th = t["road_alpha"].double(), t["road_theta"].double().abs() * (180 / math.pi)
    return {"road_alpha_mean": float(a.mean()), "road_alpha_std": float(a.std()),
            "road_alpha_min": float(a.min()), "road_alpha_max": float(a.max()),
            "road_angle_deg_mean": float(th.mean()), "road_angle_deg_max": float(th.max())}
