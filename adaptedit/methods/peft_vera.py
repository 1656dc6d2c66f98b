"""The PEFT mapping of VeRA: a PEFT ``VERA`` adapter.

    adapter_config.json   {"peft_type": "VERA", "r", "target_modules": [module names],
                           "projection_prng_key", "save_projection": true, "d_initial", ...}
    adapter_model.safetensors
        base_model.model.<module>.vera_lambda_b   (out)
        base_model.model.<module>.vera_lambda_d   (r)
        base_model.vera_A   (r × in_max),  base_model.vera_B   (out_max × r)

PEFT sizes vera_A/vera_B by the largest in/out over its target modules, the same modules as the
adapter's, so the shared matrices have the same shapes; its forward adds
b ⊙ B(d ⊙ (A x)) to the base output, the update of :mod:`adaptedit.methods.vera`.
"""

from __future__ import annotations

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_lora import PREFIX


class VeraMapping:
    peft_type = "VERA"
    dora = False

    def export(self, adapter) -> tuple[dict, dict, dict]:
        from adaptedit.methods import vera

        cfg = adapter.config
        flat, codes = {}, set()
        rank = None
        for name in cfg.modules:
            t = adapter.tensors[name]
            key, out_max, in_max, _ = vera.decode(t)
            codes.add((key, out_max, in_max))
            rank = t["vera_lambda_d"].shape[-1]
            flat[f"{PREFIX}{name}.vera_lambda_b"] = t["vera_lambda_b"].float().contiguous()
            flat[f"{PREFIX}{name}.vera_lambda_d"] = t["vera_lambda_d"].float().contiguous()
        if len(codes) != 1:  # a hand-assembled adapter: PEFT has one shared pair per adapter
            raise AdapteditError("method vera has no exact PEFT form here: the modules use "
                                 f"{len(codes)} different shared bases; PEFT's VeRA has one")
        key, out_max, in_max = codes.pop()
        a, b = vera.shared(key, rank, out_max, in_max)
        flat["base_model.vera_A"] = a.contiguous().clone()
        flat["base_model.vera_B"] = b.contiguous().clone()
        conv1d = any(m.kind == "conv1d" for m in cfg.modules.values())
        d0 = cfg.init.get("d_initial", 0.1)
        config = {"peft_type": self.peft_type, "r": int(rank), "target_modules": sorted(cfg.modules),
                  "projection_prng_key": int(key), "save_projection": True, "vera_dropout": 0.0,
                  "d_initial": float(d0), "fan_in_fan_out": conv1d, "bias": "none",
                  "init_weights": True}
        summary = {"peft_r": int(rank), "shared": [out_max, in_max], "projection_prng_key": key}
        return flat, config, summary


VERA = VeraMapping()
