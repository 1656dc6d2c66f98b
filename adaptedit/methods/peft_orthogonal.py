"""The PEFT mappings of the orthogonal family: PEFT's OFT and HRA adapters.

    OFT:  base_model.model.<module>.oft_R.weight   (n blocks × b(b−1)/2)   the skew entries q
          adapter_config.json: peft_type OFT, oft_block_size b (or r = n), coft/eps,
          use_cayley_neumann false (exact Cayley, as adaptedit) unless the adapter came from PEFT's
          Neumann series (then true, with its num_cayley_neumann_terms)
    HRA:  base_model.model.<module>.hra_u          (in × r)                the reflection vectors
          adapter_config.json: peft_type HRA, r, apply_GS false

PEFT wraps ``nn.Linear`` (and Conv2d/Embedding) for these types, not GPT-2's ``Conv1D``: an adapter
on Conv1D modules is refused (merge it instead). Neither type has a DoRA variant in PEFT.
"""

from __future__ import annotations

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_lora import PREFIX


def _linear_only(adapter, peft_type: str) -> None:
    conv = [n for n, m in adapter.config.modules.items() if m.kind == "conv1d"]
    if conv:
        raise AdapteditError(f"PEFT's {peft_type} does not wrap GPT-2's Conv1D modules (e.g. "
                             f"{conv[0]}); merge the adapter instead (adaptedit merge)")


def _one(values: dict, what: str, fix: str):
    found = set(values.values())
    if len(found) != 1:
        raise AdapteditError(f"PEFT's config has one {what} for all modules, this adapter has "
                             f"{len(found)} ({', '.join(map(str, sorted(found)))}); {fix}")
    return found.pop()


class OftMapping:
    peft_type = "OFT"
    dora = False

    def export(self, adapter) -> tuple[dict, dict, dict]:
        _linear_only(adapter, self.peft_type)
        cfg = adapter.config
        flat, blocks, sizes, eps, neumann = {}, {}, {}, {}, {}
        for name, info in cfg.modules.items():
            t = adapter.tensors[name]
            flat[f"{PREFIX}{name}.oft_R.weight"] = t["oft_R"].float().contiguous()
            blocks[name], sizes[name] = info.rank, info.shape[1] // info.rank
            eps[name] = float(t["oft_eps"].reshape(-1)[0]) if "oft_eps" in t else None
            neumann[name] = int(t["oft_neumann"].reshape(-1)[0]) if "oft_neumann" in t else None
        if len(set(sizes.values())) == 1:
            r, bs = 0, sizes.popitem()[1]
        else:
            r, bs = _one(blocks, "block size or block count", "init with --block-size"), 0
        e = _one(eps, "COFT ε", "use one --coft-eps")
        k = _one(neumann, "Cayley–Neumann setting", "use one")
        fields = {"peft_type": self.peft_type, "r": int(r), "oft_block_size": int(bs),
                  "module_dropout": 0.0, "target_modules": sorted(cfg.modules),
                  "fan_in_fan_out": False, "bias": "none", "exclude_modules": None,
                  "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
                  "coft": e is not None, "eps": e if e is not None else 6e-5,
                  "block_share": False, "use_cayley_neumann": k is not None,
                  "num_cayley_neumann_terms": k if k is not None else 5}
        summary = {"peft_type": self.peft_type, "oft_block_size": fields["oft_block_size"],
                   "r": fields["r"], "coft": fields["coft"],
                   "use_cayley_neumann": fields["use_cayley_neumann"]}
        return flat, fields, summary


class HraMapping:
    peft_type = "HRA"
    dora = False

    def export(self, adapter) -> tuple[dict, dict, dict]:
        _linear_only(adapter, self.peft_type)
        cfg = adapter.config
        flat = {f"{PREFIX}{name}.hra_u": adapter.tensors[name]["hra_u"].float().contiguous()
                for name in cfg.modules}
        r = _one({n: m.rank for n, m in cfg.modules.items()}, "rank", "init without --rank-pattern")
        fields = {"peft_type": self.peft_type, "r": int(r), "apply_GS": False,
                  "target_modules": sorted(cfg.modules), "exclude_modules": None,
                  "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
                  "bias": "none"}
        return flat, fields, {"peft_type": self.peft_type, "r": int(r)}


OFT = OftMapping()
HRA = HraMapping()
