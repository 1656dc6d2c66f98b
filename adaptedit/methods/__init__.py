"""Adapter methods. Each is a reparametrization W' = F(W, θ) with F(W, θ₀) = W.

Every method module defines, as pure tensor functions:

- ``init(w, rank, scaling, opts) -> dict``: θ₀ for a batch of weights ``w`` (b × out × in, float32),
  each entry batched along dim 0;
- ``terms(t, scaling, rank) -> [(coef, B, A), ...]``: the update as a sum of low-rank products,
  ΔW = Σ coef · B @ A (B: out × k, A: k × in), from one module's tensors ``t`` (θ and θ₀);
- ``TRAINABLE``: the names in ``t`` that training updates (the rest is frozen θ₀);
- ``default_alpha(rank)`` and ``PAPER``.

DoRA (:mod:`adaptedit.methods.dora`) is a modifier on top of any of them.
"""

from adaptedit.errors import UsageError
from adaptedit.methods import delora, lora, olora, pissa

METHODS = {
    "lora": lora,
    "pissa": pissa.PISSA,
    "milora": pissa.MILORA,
    "olora": olora,
    "delora": delora,
}


def get(name: str):
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None
