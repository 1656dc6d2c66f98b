"""Adapter methods. Each is a reparametrization W' = F(W, θ) with F(W, θ₀) = W bit-exactly.

A method is one file here that states its equation and paper in its docstring and provides pure
tensor functions (the interface, with its defaults: :mod:`adaptedit.methods.base`); the registry
below names it. DoRA (:mod:`adaptedit.methods.dora`) is a modifier on top of any of them:
:func:`resolve` returns the method with or without it. Nothing outside this package compares method
names: layer, merge, inspect, export and train call the entry's functions.
"""

from adaptedit.errors import UsageError
from adaptedit.methods import (boft, delora, dora, hra, ia3, lora, oft, olora, pissa, road, ssvd,
                               svft, vera)
from adaptedit.methods.base import DoRA, Method

METHODS = {
    "lora": Method("lora", lora),
    "pissa": Method("pissa", pissa.PISSA),
    "milora": Method("milora", pissa.MILORA),
    "olora": Method("olora", olora),
    "delora": Method("delora", delora),
    "oft": Method("oft", oft),
    "boft": Method("boft", boft),
    "hra": Method("hra", hra),
    "ia3": Method("ia3", ia3),
    "vera": Method("vera", vera),
    "svft": Method("svft", svft),
    "road": Method("road", road),
    "ssvd": Method("ssvd", ssvd),
}


# PEFT ``init_lora_weights`` values that rewrite the base weight when PEFT builds (or loads) the
# adapter: PiSSA and OLoRA set W ← W − s·B₀A₀ (pissa.PEFT_INITS, olora.PEFT_INITS), CorDA and LoRA-GA
# likewise from activation statistics / gradients, LoftQ replaces W by a quantised residual. An adapter saved with one of
# them (without PEFT's ``path_initial_model_for_weight_conversion``) only means something on that
# rewritten base; read as ΔW = s·BA on the original base it is silently wrong.
PEFT_BASE_REWRITING_INITS = pissa.PEFT_INITS + olora.PEFT_INITS + ("corda", "loftq", "lora_ga")


def peft_init_rewrites_base(value) -> bool:
    """True when PEFT's ``init_lora_weights=value`` rewrites the base weight (see above)."""
    return isinstance(value, str) and value.lower().startswith(PEFT_BASE_REWRITING_INITS)


def peft_reader(peft_type: str):
    """(method name, PEFT mapping) of the method whose mapping reads PEFT adapters of
    ``peft_type`` (a mapping with ``read``), or None. LoRA folders are read by peft_io itself."""
    for name, method in METHODS.items():
        mapping = method.PEFT
        if getattr(mapping, "peft_type", None) == peft_type and hasattr(mapping, "read"):
            return name, mapping
    return None


# modifiers a method spec may add with "+NAME" (``init``'s flag of the same name)
MODIFIERS = {"dora": dora}


def parse_spec(spec: str) -> tuple[str, dict]:
    """"METHOD[+MODIFIER...]" (e.g. "pissa+dora") → (method name, {modifier: True}).

    Methods are the registry's; a method module may set ``MODIFIERS = (...)`` to the modifiers it
    accepts (default: all of :data:`MODIFIERS`)."""
    name, *mods = [p.strip() for p in spec.strip().split("+")]
    method = get(name)
    allowed = getattr(method, "MODIFIERS", tuple(MODIFIERS))
    flags = {}
    for m in mods:
        if m not in MODIFIERS:
            raise UsageError(f"method {spec!r}: unknown modifier +{m}; "
                             f"available: {', '.join('+' + k for k in MODIFIERS)}")
        if m not in allowed:
            raise UsageError(f"method {spec!r}: +{m} does not apply to {name}")
        if m in flags:
            raise UsageError(f"method {spec!r}: +{m} given twice")
        flags[m] = True
    return name, flags


def spec_name(name: str, flags: dict) -> str:
    """The inverse of :func:`parse_spec`: "pissa", {"dora": True} → "pissa+dora"."""
    return "+".join([name] + [m for m in MODIFIERS if flags.get(m)])


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        if name in MODIFIERS:
            raise UsageError(f"{name!r} is not a method but goes on top of one: --method lora "
                             f"--{name} (compare: --methods lora+{name})") from None
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}") from None


_DORA: dict = {}


def resolve(name: str, dora: bool = False) -> Method:
    """The registry entry ``name``, with DoRA's magnitude on top when ``dora``."""
    method = get(name)
    if not dora:
        return method
    if name not in _DORA:
        _DORA[name] = DoRA(method)
    return _DORA[name]
