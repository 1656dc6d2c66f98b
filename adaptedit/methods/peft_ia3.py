"""The PEFT mapping of (IA)³: a PEFT ``IA3`` adapter.

    adapter_config.json   {"peft_type": "IA3", "target_modules": [module names],
                           "feedforward_modules": [the input-side ones], "fan_in_fan_out", ...}
    adapter_model.safetensors
        base_model.model.<module>.ia3_l    (out × 1) output side,  (1 × in) input side

PEFT computes y = l ⊙ base(x) on the output side (the bias scaled too) and base(l ⊙ x) on the
input side; its merge multiplies the stored weight by l (transposed for GPT-2's Conv1D, whose
vectors keep the same layout). adaptedit's (IA)³ leaves the bias alone, so an output-side module
with a bias is refused: no PEFT IA3 adapter computes that update.
"""

from __future__ import annotations

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_lora import PREFIX


class IA3Mapping:
    peft_type = "IA3"
    dora = False

    def export(self, adapter) -> tuple[dict, dict, dict]:
        cfg = adapter.config
        flat, feedforward = {}, []
        for name, info in cfg.modules.items():
            t = adapter.tensors[name]
            inp = bool(t["ia3_input"].reshape(-1)[0] > 0.5)
            if not inp and info.has_bias:
                raise AdapteditError(
                    f"method ia3 has no exact PEFT form for {name}: PEFT's IA3 scales an "
                    "output-side module's bias too, adaptedit's does not (so that merge is exact); "
                    "merge the adapter instead, or init it with --targets that exclude modules "
                    "with a bias on the output side")
            lv = t["ia3_l"].float().contiguous()
            flat[f"{PREFIX}{name}.ia3_l"] = (lv.reshape(1, -1) if inp else lv.reshape(-1, 1)).clone()
            if inp:
                feedforward.append(name)
        conv1d = any(m.kind == "conv1d" for m in cfg.modules.values())
        config = {"peft_type": self.peft_type, "target_modules": sorted(cfg.modules),
                  "feedforward_modules": sorted(feedforward), "fan_in_fan_out": conv1d,
                  "init_ia3_weights": True, "exclude_modules": None}
        summary = {"feedforward_modules": len(feedforward),
                   "output_side_modules": len(cfg.modules) - len(feedforward)}
        return flat, config, summary


IA3 = IA3Mapping()
