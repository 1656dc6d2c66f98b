"""The PEFT mapping of RoAd: a PEFT ``ROAD`` adapter (variant road_1).

    adapter_config.json   {"peft_type": "ROAD", "variant": "road_1", "group_size",
                           "target_modules": [module names], ...}
    adapter_model.safetensors
        base_model.model.<module>.road_theta   (out / 2)
        base_model.model.<module>.road_alpha   (out / 2)

PEFT rotates the whole output of the module (its bias too) and wraps ``nn.Linear`` only, so an
adapter with a biased module or a GPT-2 Conv1D module is refused: no PEFT RoAd adapter computes
adaptedit's update there (merge deploys it).
"""

from __future__ import annotations

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_lora import PREFIX


class RoadMapping:
    peft_type = "ROAD"
    dora = False

    def export(self, adapter) -> tuple[dict, dict, dict]:
        cfg = adapter.config
        flat, groups = {}, set()
        for name, info in cfg.modules.items():
            why = ("is a GPT-2 Conv1D (PEFT's RoAd wraps nn.Linear only)" if info.kind == "conv1d"
                   else "has a bias, which PEFT's RoAd rotates and adaptedit's does not (so that "
                   "merge is exact)" if info.has_bias else None)
            if why:
                raise AdapteditError(f"method road has no exact PEFT form: {name} {why}; merge the "
                                     "adapter instead, or init it with --targets that exclude it")
            t = adapter.tensors[name]
            groups.add(int(t["road_group"].reshape(-1)[0]))
            flat[f"{PREFIX}{name}.road_theta"] = t["road_theta"].float().contiguous()
            flat[f"{PREFIX}{name}.road_alpha"] = t["road_alpha"].float().contiguous()
        if len(groups) != 1:
            raise AdapteditError(f"method road has no exact PEFT form here: the modules use group "
                                 f"sizes {sorted(groups)}; PEFT's RoAd has one per adapter")
        g = groups.pop()
        config = {"peft_type": self.peft_type, "variant": "road_1", "group_size": g,
                  "target_modules": sorted(cfg.modules), "init_weights": True}
        return flat, config, {"group_size": g, "variant": "road_1"}


ROAD = RoadMapping()
