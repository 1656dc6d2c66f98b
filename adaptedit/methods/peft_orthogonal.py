"""The PEFT mappings of the orthogonal family: PEFT's OFT and HRA adapters.

    OFT:  base_model.model.<module>.oft_R.weight   (n blocks × b(b−1)/2)   the skew entries q
          adapter_config.json: peft_type OFT, oft_block_size b (or r = n), coft/eps,
          use_cayley_neumann false (exact Cayley, as adaptedit) unless the adapter came from PEFT's
          Neumann series (then true, with its num_cayley_neumann_terms)
    HRA:  base_model.model.<module>.hra_u          (in × r)                the reflection vectors
          adapter_config.json: peft_type HRA, r, apply_GS false

PEFT wraps ``nn.Linear`` (and Conv2d/Embedding) for these types, not GPT-2's ``Conv1D``: an adapter
on Conv1D modules is refused (merge it instead). Neither type has a DoRA variant in PEFT.

Import (``read``, the inverse of ``export``; :class:`adaptedit.peft_io.PeftFolder`). The weights
give each module's input width, not its output width, so the base recorded in
``base_model_name_or_path`` is read (headers only) to size the modules. Per module the block size
comes from the tensor (PEFT adjusts a size that does not divide a module). Read exactly:
``coft``/``eps``, ``use_cayley_neumann`` with ``num_cayley_neumann_terms`` (PEFT ≥ 0.18's series;
an older ``peft_version`` trained another series and is refused), ``block_share`` (the shared
block repeated; refused with COFT, whose bound PEFT then takes over one block), HRA's ``apply_GS``
(the Gram–Schmidt vectors ũᵢ are stored: Π(I − 2ũᵢũᵢᵀ) = I − 2Σũᵢũᵢᵀ for orthonormal ũᵢ).
Ignored because they do not change the function: ``init_weights`` (only the starting values),
``module_dropout`` (PEFT's OFT never applies it in the forward pass), ``target_modules``,
``exclude_modules``, ``layers_to_transform``/``layers_pattern`` (the tensors name the modules),
``fan_in_fan_out`` (PEFT resets it on nn.Linear). Refused, naming the key: ``bias`` ≠ "none"
(PEFT trains biases adaptedit keeps frozen), an odd HRA ``r`` (a product of an odd number of
reflections has determinant −1; adaptedit's chains pair them), tensors of other layer types.
"""

from __future__ import annotations

import math
import re

import torch

from adaptedit.errors import AdapteditError
from adaptedit.methods.peft_lora import PREFIX

NEUMANN_SINCE = (0, 18)  # PEFT changed its Cayley–Neumann series in 0.18.0


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
        if fields["use_cayley_neumann"]:  # PEFT warns on a Neumann adapter without it
            fields["peft_version"] = ".".join(map(str, NEUMANN_SINCE)) + ".0"
        return flat, fields, summary

    def read(self, src) -> tuple[dict, dict, dict]:
        """(modules, tensors, init record) of a PEFT OFT folder (see the module docstring)."""
        cfg = src.cfg
        _no_bias(src)
        neumann = cfg.get("use_cayley_neumann", True)  # PEFT's default
        terms = cfg.get("num_cayley_neumann_terms", 5)
        coft, eps = bool(cfg.get("coft", False)), cfg.get("eps", 6e-5)
        share = bool(cfg.get("block_share", False))
        if not isinstance(neumann, bool):
            src.refuse("use_cayley_neumann", "expected true or false")
        if neumann:
            if not (isinstance(terms, int) and not isinstance(terms, bool) and terms >= 1):
                src.refuse("num_cayley_neumann_terms", "expected an integer ≥ 1")
            if _version(cfg.get("peft_version")) < NEUMANN_SINCE:
                src.refuse("peft_version", "a Cayley–Neumann OFT adapter saved before PEFT 0.18.0 "
                           "used an older series that adaptedit does not compute; retrain it with "
                           "PEFT ≥ 0.18")
        if coft and not (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                         and math.isfinite(eps) and eps > 0):
            src.refuse("eps", "COFT's ε must be a positive number")
        if coft and share:
            src.refuse("block_share", "with coft, PEFT bounds the one shared block by ε (not ε/√n "
                       "per block as adaptedit's COFT); not readable exactly")
        modules, tensors, sizes = {}, {}, set()
        for key, q in src.flat.items():
            name = _module_of(src, key, ".oft_R.weight")
            if q.dim() != 2:
                raise AdapteditError(f"{src.wpath}: {PREFIX}{key} is {tuple(q.shape)}, not "
                                     "(blocks × b(b−1)/2)")
            bs = (1 + math.isqrt(1 + 8 * q.shape[1])) // 2
            if bs < 2 or bs * (bs - 1) // 2 != q.shape[1]:
                raise AdapteditError(f"{src.wpath}: {PREFIX}{key} has {q.shape[1]} entries per "
                                     "block, not b(b−1)/2 for a block size b ≥ 2")
            t = src.target(name)
            n = t.in_features // bs
            if n * bs != t.in_features or q.shape[0] != (1 if share else n):
                raise AdapteditError(f"{src.wpath}: {PREFIX}{key} holds {q.shape[0]} block(s) of "
                                     f"{bs}, which do not cover the {t.in_features} inputs of "
                                     f"{name} in base {src.base_ref}")
            q = q.float().expand(n, -1).clone() if share else q.float().clone()
            tensors[name] = {"oft_R": q}
            if coft:
                tensors[name]["oft_eps"] = torch.tensor([float(eps)])
            if neumann:
                tensors[name]["oft_neumann"] = torch.tensor([float(terms)])
            modules[name] = _info(t, n)
            sizes.add(bs)
        init = {"block_size": sizes.pop() if len(sizes) == 1 else None,
                "coft_eps": float(eps) if coft else None}
        return modules, tensors, {k: v for k, v in init.items() if v is not None}


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

    def read(self, src) -> tuple[dict, dict, dict]:
        """(modules, tensors, init record) of a PEFT HRA folder (see the module docstring)."""
        cfg = src.cfg
        _no_bias(src)
        gs = cfg.get("apply_GS", False)
        if not isinstance(gs, bool):
            src.refuse("apply_GS", "expected true or false")
        modules, tensors = {}, {}
        for key, u in src.flat.items():
            name = _module_of(src, key, ".hra_u")
            if u.dim() != 2:
                raise AdapteditError(f"{src.wpath}: {PREFIX}{key} is {tuple(u.shape)}, not "
                                     "(in × r)")
            r = u.shape[1]
            if cfg.get("r") is not None and r != cfg["r"]:
                src.refuse("r", f"module {name} has {r} reflections in the weights")
            if r % 2:
                src.refuse("r", "an odd number of reflections has determinant −1, and adaptedit's "
                           "HRA pairs its reflections (determinant +1); not readable exactly")
            t = src.target(name, in_features=u.shape[0])
            u = u.float()
            tensors[name] = {"hra_u": gram_schmidt(u) if gs else u.clone()}
            modules[name] = _info(t, r)
        return modules, tensors, {}


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """PEFT's apply_GS vectors: u₁, u₂, … orthonormalised in order (each against the earlier
    ones, one at a time)."""
    out = []
    for i in range(u.shape[1]):
        v = u[:, i]
        for w in out:
            v = v - (w @ v) * w
        out.append(v / v.norm())
    return torch.stack(out, dim=1)


def _no_bias(src) -> None:
    if src.cfg.get("bias", "none") != "none":
        src.refuse("bias", f"PEFT's {src.peft_type} then trains the base biases, which adaptedit "
                   "keeps frozen; re-save the adapter with bias=\"none\"")


def _module_of(src, key: str, suffix: str) -> str:
    if not key.endswith(suffix):
        raise AdapteditError(f"{src.wpath}: tensor {PREFIX}{key} is not an {src.peft_type} weight "
                             f"of an nn.Linear (…{suffix}); other layer types and biases are not "
                             "supported")
    return key[: -len(suffix)]


def _info(t, rank: int):
    from adaptedit.adapter import ModuleInfo

    return ModuleInfo.of(t, rank=int(rank), alpha=1.0, scaling=1.0 / rank, fingerprint="")


def _version(text) -> tuple:
    """"0.18.0" → (0, 18); anything else (absent: PEFT < 0.18 did not write it) → (0, 0)."""
    m = re.match(r"(\d+)\.(\d+)", str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


OFT = OftMapping()
HRA = HraMapping()
