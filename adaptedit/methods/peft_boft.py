"""The PEFT mapping of BOFT: a PEFT ``BOFT`` adapter.

    adapter_config.json   {"peft_type": "BOFT", "boft_block_size": b, "boft_block_num": 0,
                           "boft_n_butterfly_factor": m, "target_modules": [module names], ...}
    adapter_model.safetensors
        base_model.model.<module>.boft_R   (m × n × b × b)   PEFT uses its skew part ½(A − Aᵀ)
        base_model.model.<module>.boft_s   (out × 1)         the output scale

PEFT's forward is y = s ⊙ (W x̃) + bias with x̃ = x M (row vectors), M = B_{m−1} ⋯ B₀ formed
densely; :mod:`adaptedit.methods.boft` computes the same function block-wise. Import takes the
upper triangle of ½(A − Aᵀ), the entries PEFT's Cayley transform sees.

PEFT computes m > 1 only when its CUDA extension (fbd_cuda) builds; without it (any CPU machine)
PEFT sets m = 1 for the layers it creates, so a folder with m > 1 factors loads in PEFT only where
the extension builds. Export therefore always writes one factor: m = 1 as is (the skew matrix
itself, A = Q, so ½(A − Aᵀ) = Q exactly and export(import(F)) gives PEFT the same rotation bit for
bit); m > 1 folded into one factor of blocks of b·2^(m−1), M's own diagonal blocks (M never mixes
inputs across those groups), each written as its inverse Cayley transform: the same function
(within float rounding), though PEFT then trains it as one factor. An adapter PEFT saved without
the extension has one factor whatever its config says: import reads the number of factors from
the tensor, which is what PEFT computed. PEFT wraps
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
        _linear_only(adapter, self.peft_type)
        cfg = adapter.config
        flat, sizes, factors = {}, {}, {}
        for name, info in cfg.modules.items():
            t = adapter.tensors[name]
            m = t["boft_R"].shape[0]
            a = _one_factor(name, t, info) if m > 1 else _skew_full(t, info)
            flat[f"{PREFIX}{name}.boft_R"] = a.contiguous()
            flat[f"{PREFIX}{name}.boft_s"] = t["boft_s"].float().reshape(-1, 1).contiguous()
            sizes[name], factors[name] = a.shape[-1], m
        bs = _one(sizes, "block size", "init with --block-size")
        m = _one(factors, "number of butterfly factors", "init with --butterfly-factors")
        fields = {"peft_type": self.peft_type, "boft_block_size": int(bs), "boft_block_num": 0,
                  "boft_n_butterfly_factor": 1, "boft_dropout": 0.0,
                  "target_modules": sorted(cfg.modules), "exclude_modules": None,
                  "fan_in_fan_out": False, "bias": "none", "init_weights": True,
                  "layers_to_transform": None, "layers_pattern": None}
        summary = {"peft_type": self.peft_type, "boft_block_size": int(bs),
                   "boft_n_butterfly_factor": 1}
        if m > 1:
            summary["folded"] = (f"{m} butterfly factors of blocks of {bs >> (m - 1)} written as "
                                 f"PEFT's one factor of blocks of {bs} (the same rotation; PEFT "
                                 "computes m > 1 only with its CUDA extension)")
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


def _skew_full(t: dict, info) -> torch.Tensor:
    """One factor's (1, n, b, b) skew matrices Q, whose skew part ½(Q − Qᵀ) is Q exactly."""
    from adaptedit.methods.oft import skew

    q = t["boft_R"].float()
    bs = info.shape[1] // info.rank
    return skew(q.reshape(q.shape[1], -1), bs).unsqueeze(0)


def _one_factor(name: str, t: dict, info) -> torch.Tensor:
    """M's diagonal blocks (b·2^(m−1) wide) as one factor: the inverse Cayley transform
    Q = (I − R)(I + R)⁻¹ of each block R (float64), refused where R is near a half-turn (I + R
    nearly singular: the Cayley form cannot hold it accurately)."""
    from adaptedit.methods.boft import dense_blocks

    r = dense_blocks(t, info)
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    if float(torch.linalg.svdvals(eye + r).min()) < 1e-2:
        raise AdapteditError(f"method boft has no exact PEFT form for {name}: its rotation turns "
                             "a direction by nearly 180°, which PEFT's Cayley form cannot hold "
                             "accurately; merge the adapter instead")
    q = torch.linalg.solve(eye + r, eye - r, left=False)
    return (0.5 * (q - q.transpose(-1, -2))).float().unsqueeze(0)


BOFT = BoftMapping()
