"""(IA)³: learned per-channel gains, initialised to 1.

    output side (k, v, up-type modules):   y = l ⊙ (W x) + b        W' = diag(l) W
    input side  (the MLP down projection):  y = W (l ⊙ x) + b        W' = W diag(l)
    l₀ = 1                                                            (so W' = W bit for bit)

Hypothesis: much of adaptation is gain control — rescaling which channels a layer reads or
writes, without changing any direction. One vector per module: out entries on the output side,
in entries on the input side (PEFT's ``feedforward_modules``: the modules whose input is the MLP's
intermediate activation).
Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", NeurIPS 2022, arXiv:2205.05638.

- Targets: without ``--targets``, PEFT's defaults: k_proj, v_proj, down_proj (Llama-like) and
  c_attn, mlp.c_proj (GPT-2), whichever the model has. The input side is chosen by name
  (:data:`FEEDFORWARD`: down_proj, mlp.c_proj, fc2, w2, dense_4h_to_h).
- Tensors per module: ``ia3_l`` (the gains, trained) and ``ia3_input`` (1 element, frozen: 1 for
  the input side, 0 for the output side).
- The bias is not scaled: W' = F(W, θ) changes the weight only, so that merge is exact. PEFT scales
  the bias of an output-side module too (y = l ⊙ (W x + b)); an adapter with an output-side module
  that has a bias therefore has no exact PEFT form and its export is refused (it merges exactly).
- Forward: output side y₀·l in float32, rounded once (PEFT's operation, bit-identical when the
  module has no bias; with a bias y₀ + (l − 1) ⊙ (y₀ − b)); input side W((x·l) rounded to x's
  dtype) as PEFT. At l = 1 both are y₀ exactly.
- inspect: the gains' mean, std, min and max per module (and their side).
"""

from __future__ import annotations

import torch

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_ia3 import IA3 as PEFT  # noqa: F401  (the PEFT mapping)

PAPER = "Liu et al., (IA)³, NeurIPS 2022 (arXiv:2205.05638)"
TRAINABLE = ("ia3_l",)
# PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING for llama and gpt2, as one suffix list
TARGETS = "k_proj,v_proj,down_proj,c_attn,mlp.c_proj"
FEEDFORWARD = ("down_proj", "mlp.c_proj", "fc2", "w2", "dense_4h_to_h")
LR = 3e-3  # the paper's learning rate for (IA)³ (T-Few, §3.3)
LR_SOURCE = "(IA)³ paper (T-Few §3.3: Adafactor, lr 3e-3)"
SCALED = False  # no α, no rsLoRA
DEFAULT_RANK = 1  # recorded as each module's rank: one gain per channel, no rank to choose
RANKED = False  # init refuses --rank / --rank-pattern
DROPOUT = False  # a gain vector has no input path to drop
VECTORS = {"gain": ("distribution", "gain l (1 at init)")}


def default_alpha(rank: int) -> float:
    return 1.0  # unused: the gains are applied as they are


def plan(targets, ranks: dict, options: dict, rank_given: bool) -> tuple[dict, dict]:
    """No rank: every module records 1 (``init --rank`` is refused, RANKED = False)."""
    return {n: 1 for n in ranks}, options


def is_feedforward(name: str) -> bool:
    """The input side: the module's input is the MLP's intermediate activation (by name)."""
    return any(name == s or name.endswith("." + s) for s in FEEDFORWARD)


def init(w: torch.Tensor, opts: dict) -> dict:
    b, out_f, in_f = w.shape
    names = opts.get("names") or [""] * b
    sides = [is_feedforward(n) for n in names]
    sizes = {in_f if inp else out_f for inp in sides}
    if len(sizes) != 1:  # init batches modules of one shape: only a non-square mix can clash
        raise AdapteditError(f"(IA)³: modules of shape {out_f}×{in_f} on both sides; target "
                             "them in two adapters (--targets)")
    return {"ia3_l": torch.ones(b, sizes.pop()),
            "ia3_input": torch.tensor([[float(inp)] for inp in sides])}


def input_side(t: dict) -> bool:
    return bool(t["ia3_input"].reshape(-1)[0] > 0.5)


def merged(w: torch.Tensor, t: dict, info) -> torch.Tensor:
    """W' = W diag(l) (input side) or diag(l) W (output side), float32, as PEFT's merge."""
    lv = t["ia3_l"].float()
    return w.float() * (lv.unsqueeze(0) if input_side(t) else lv.unsqueeze(-1))


def is_identity(t: dict) -> bool:
    return bool((t["ia3_l"] == 1).all())


def _wx(layer, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """W x in float32 (the base output without its bias)."""
    y = layer.base(x) if y is None else y
    bias = getattr(layer.base, "bias", None)
    return y.float() - bias.float() if bias is not None else y.float()


def delta_x(layer, x: torch.Tensor) -> torch.Tensor:
    """ΔW x = (l − 1) ⊙ W x (output side) or W ((l − 1) ⊙ x) (input side), float32."""
    t = layer.tensors()
    lv = t["ia3_l"]
    if input_side(t):
        w = layer.weight().float()
        return (x.float() * (lv - 1)) @ w.transpose(0, 1)
    return _wx(layer, x) * (lv - 1)


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    t = layer.tensors()
    lv = t["ia3_l"]
    if input_side(t):
        return layer.base((x.float() * lv).to(x.dtype))
    y = layer.base(x)
    if getattr(layer.base, "bias", None) is None:
        return (y.float() * lv).to(y.dtype)  # PEFT's operation
    return (y.float() + (lv - 1) * _wx(layer, x, y)).to(y.dtype)  # the bias stays unscaled


def validate(t: dict, info) -> str | None:
    if "ia3_input" not in t:
        return "lacks ia3_input (the side of the gains)"
    n = info.shape[1] if input_side(t) else info.shape[0]
    if tuple(t["ia3_l"].shape) != (n,):
        side = "input" if input_side(t) else "output"
        return f"ia3_l has shape {tuple(t['ia3_l'].shape)}; the {side} side needs ({n},)"
    return None


def vectors(t: dict, info) -> dict:
    return {"gain": t["ia3_l"].double()}


def extras(t: dict, info, w, fro: float) -> dict:
    """The distribution of the gains of this module."""
    lv = t["ia3_l"].double()
    return {"ia3_side": "input" if input_side(t) else "output",
            "gain_mean": float(lv.mean()), "gain_std": float(lv.std()) if lv.numel() > 1 else 0.0,
            "gain_min": float(lv.min()), "gain_max": float(lv.max())}
