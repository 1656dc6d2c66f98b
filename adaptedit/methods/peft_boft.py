"""The PEFT mapping of BOFT: a PEFT ``BOFT`` adapter.

    adapter_config.json   {"peft_type": "BOFT", "boft_block_size": b, "boft_block_num": 0,
                           "boft_n_butterfly_factor": m, "target_modules": [module names], ...}
    adapter_model.safetensors
        base_model.model.<module>.boft_R   (m × n × b × b)   PEFT uses its skew part ½(A − Aᵀ)
        base_model.model.<module>.boft_s   (out × 1)         the output scale

PEFT's forward is y = s ⊙ (W x̃) + bias with x̃ = x M (row vectors), M = B_{m−1} ⋯ B₀ formed
densely; :mod:`adaptedit.methods.boft` computes the same function block-wise. Export writes the skew matrix
itself (A = Q, so ½(A − Aᵀ) = Q exactly); import takes the upper triangle of ½(A − Aᵀ), the entries
PEFT's Cayley transform sees, so export(import(F)) gives PEFT the same rotation bit for bit.

PEFT computes m > 1 only when its CUDA extension (fbd_cuda) builds; without it (any CPU machine)
PEFT sets m = 1 for the layers it creates, so an m > 1 adapter then fails to load in PEFT (its
boft_R has m factors). An adapter PEFT saved that way has one factor, whatever the config says:
import reads the number of factors from the tensor, which is what PEFT computed. PEFT wraps
``nn.Linear`` only (not GPT-2's Conv1D). Ignored on import, as they do not change the function:
``boft_dropout`` (training only), ``init_weights``, ``target_modules``, ``exclude_modules``,
``layers_to_transform``/``layers_pattern``, ``fan_in_fan_out`` (PEFT resets it on nn.Linear),
``boft_block_size``/``boft_block_num`` (the tensors give them). Refused: ``bias`` ≠ "none".
"""

from __future__ import annotations

import torch

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_lora import PREFIX
from adaptedit.methods.peft_orthogonal import _info, _linear_only, _module_of, _no_bias, _one


class BoftMapping:
    peft_type = "BOFT"
    dora = False

    def export(self, adapter) -> tuple[dict, dict, dict]:
        from adaptedit.methods.oft import skew

        _linear_only(adapter, self.peft_type)
        cfg = adapter.config
        flat, sizes, factors = {}, {}, {}
        for name, info in cfg.modules.items():
            t = adapter.tensors[name]
            q = t["boft_R"].float()
            m, n, _ = q.shape
            bs = info.shape[1] // info.rank
            flat[f"{PREFIX}{name}.boft_R"] = skew(q.reshape(m * n, -1), bs).reshape(
                m, n, bs, bs).contiguous()
            flat[f"{PREFIX}{name}.boft_s"] = t["boft_s"].float().reshape(-1, 1).contiguous()
            sizes[name], factors[name] = bs, m
        bs = _one(sizes, "block size", "init with --block-size")
        m = _one(factors, "number of butterfly factors", "init with --butterfly-factors")
        fields = {"peft_type": self.peft_type, "boft_block_size": int(bs), "boft_block_num": 0,
                  "boft_n_butterfly_factor": int(m), "boft_dropout": 0.0,
                  "target_modules": sorted(cfg.modules), "exclude_modules": None,
                  "fan_in_fan_out": False, "bias": "none", "init_weights": True,
                  "layers_to_transform": None, "layers_pattern": None}
        summary = {"peft_type": self.peft_type, "boft_block_size": int(bs),
                   "boft_n_butterfly_factor": int(m)}
        if m > 1:
            summary["peft_needs"] = ("PEFT's CUDA extension fbd_cuda (without it PEFT forces one "
                                     "butterfly factor and cannot load this adapter)")
        return flat, fields, summary

    def read(self, src) -> tuple[dict, dict, dict]:
        """(modules, tensors, init record) of a PEFT BOFT folder (see the module docstring)."""
        from adaptedit.methods.boft import fits

        _no_bias(src)
        found: dict = {}
        for key, v in src.flat.items():
            if key.endswith(".boft_s"):
                found.setdefault(key[: -len(".boft_s")], {})["s"] = v
            else:
                found.setdefault(_module_of(src, key, ".boft_R"), {})["R"] = v
        modules, tensors, shapes = {}, {}, set()
        for name, parts in found.items():
            if set(parts) != {"R", "s"}:
                raise AdapteditError(f"{src.wpath}: module {name} lacks "
                                     f"{'boft_R' if 'R' not in parts else 'boft_s'}")
            a, s = parts["R"].float(), parts["s"].float()
            if a.dim() != 4 or a.shape[-1] != a.shape[-2] or s.dim() != 2 or s.shape[1] != 1:
                raise AdapteditError(f"{src.wpath}: {name} has boft_R {tuple(a.shape)} and boft_s "
                                     f"{tuple(s.shape)}, not (m × n × b × b) and (out × 1)")
            m, n, bs, _ = a.shape
            t = src.target(name, in_features=n * bs)
            if t.out_features != s.shape[0]:
                raise AdapteditError(f"{src.wpath}: {name} has {s.shape[0]} scales but "
                                     f"{t.out_features} outputs in base {src.base_ref}")
            if not fits(n * bs, bs, m):
                raise AdapteditError(f"{src.wpath}: {name}: {m} butterfly factors of blocks of "
                                     f"{bs} do not fit its {n * bs} inputs")
            rows, cols = torch.triu_indices(bs, bs, 1)
            q = (0.5 * (a - a.transpose(-1, -2)))[..., rows, cols]  # PEFT's skew part
            tensors[name] = {"boft_R": q.contiguous(), "boft_s": s.reshape(-1).clone()}
            modules[name] = _info(t, n)
            shapes.add((bs, m))
        init = {}
        if len(shapes) == 1:
            bs, m = shapes.pop()
            init = {"block_size": bs, "butterfly_factors": m}
        return modules, tensors, init


BOFT = BoftMapping()
