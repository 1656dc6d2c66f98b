"""LoRA: a low-rank update learned from zero.

    W' = W + s · B A        A: r × in (kaiming-uniform, as PEFT),  B: out × r (zeros),  s = α / r

Hypothesis: a useful change of the weights has low rank.
Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, arXiv:2106.09685.
"""

import math

import torch

from adaptedit.methods.peft_lora import NATIVE

PAPER = "Hu et al., LoRA, ICLR 2022 (arXiv:2106.09685)"
TRAINABLE = ("lora_A", "lora_B")
PEFT = NATIVE  # PEFT LoRA with the same r, α and rsLoRA


def default_alpha(rank: int) -> float:
    return 2.0 * rank


def init(w: torch.Tensor, opts: dict) -> dict:
    b, out_f, in_f = w.shape
    rank = opts["rank"]
    bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=√5) on an (r × in) weight
    a = torch.rand(b, rank, in_f, generator=opts["generator"]) * (2 * bound) - bound
    return {"lora_A": a, "lora_B": torch.zeros(b, out_f, rank)}


def terms(t: dict, scaling: float, rank: int) -> list:
    return [(scaling, t["lora_B"], t["lora_A"])]


def is_identity(t: dict) -> bool:
    """B = B₀ = 0 (A does not matter then); an imported PEFT LoRA is at θ₀ when its B is zero."""
    return not bool(torch.count_nonzero(t["lora_B"]))
