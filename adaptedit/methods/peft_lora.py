"""The PEFT mapping of the low-rank family: a PEFT LoRA (or DoRA) adapter.

PEFT's update of a module is ΔW = s · B A with s = α/r (α/√r with rsLoRA), r and α per module from
``rank_pattern``/``alpha_pattern``. For GPT-2's Conv1D, ``fan_in_fan_out`` is true but lora_A/lora_B
keep the (r × in)/(out × r) layout.

- ``NATIVE`` (LoRA): keeps its rank, α and rsLoRA, so the file trains on in PEFT as it would have.
- ``CONCAT`` (any method with ``terms``: PiSSA, MiLoRA, OLoRA: s(BA − B₀A₀); DeLoRA: two normalised
  terms): an exact LoRA of rank Σk by concatenation, A' = [A; A₀], B' = [c₁B | c₂B₀], with the
  coefficients folded into B' and α = r so that PEFT's scaling is exactly 1.

DoRA keeps its magnitude vector: PEFT's DoRA is m ⊙ (W + s·B'A') / ‖W + s·B'A'‖_row, the same
function as adaptedit's.
"""

from __future__ import annotations

import re

from adaptedit.methods.base import concat_factors

PREFIX = "base_model.model."


def pattern_key(patterns, name: str):
    """PEFT's rule: the first pattern key K such that ``(.*\\.)?(K)$`` matches the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def common_and_patterns(values: dict, cast) -> tuple:
    """The most common value, and {escaped module name: value} for the modules that differ."""
    counts: dict = {}
    for v in values.values():
        counts[v] = counts.get(v, 0) + 1
    common = max(counts, key=counts.get)
    return common, {re.escape(n): cast(v) for n, v in values.items() if v != common}


class LoraMapping:
    peft_type = "LORA"
    dora = True

    def __init__(self, native: bool):
        self.native = native

    def module(self, method, t: dict, info) -> tuple[dict, tuple]:
        """{key suffix: tensor} and (rank, alpha) of one module."""
        if self.native:
            a, b = t["lora_A"].float(), t["lora_B"].float()
            ra = (info.rank, info.alpha)
        else:
            b, a = concat_factors(method.inner.terms(t, info) if method.dora
                                  else method.terms(t, info))
            ra = (a.shape[0], float(a.shape[0]))  # α = r: scaling exactly 1
        out = {"lora_A.weight": a.contiguous(), "lora_B.weight": b.contiguous()}
        if method.dora:
            out["lora_magnitude_vector"] = t["magnitude"].float().contiguous()
        return out, ra

    def export(self, adapter) -> tuple[dict, dict, dict]:
        """({PEFT key: tensor}, adapter_config.json fields, summary) for an adapter."""
        cfg, method = adapter.config, adapter.method
        flat, ranks = {}, {}
        for name, info in cfg.modules.items():
            parts, ranks[name] = self.module(method, adapter.tensors[name], info)
            flat.update({f"{PREFIX}{name}.{k}": v for k, v in parts.items()})
        rank, rank_pattern = common_and_patterns({n: ra[0] for n, ra in ranks.items()}, int)
        alpha, alpha_pattern = common_and_patterns({n: ra[1] for n, ra in ranks.items()}, float)
        conv1d = any(m.kind == "conv1d" for m in cfg.modules.values())
        config = {
            "peft_type": self.peft_type, "r": int(rank), "lora_alpha": float(alpha),
            "target_modules": sorted(cfg.modules), "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "use_rslora": bool(cfg.rslora) if self.native else False,
            "use_dora": bool(method.dora), "fan_in_fan_out": conv1d, "lora_dropout": 0.0,
            "bias": "none", "init_lora_weights": True,
        }
        summary = {"peft_r": config["r"], "lora_alpha": config["lora_alpha"],
                   "rank_pattern": len(rank_pattern),
                   "exact_rank": "r" if self.native else "concatenated terms (2r)"}
        return flat, config, summary


NATIVE = LoraMapping(native=True)
CONCAT = LoraMapping(native=False)
