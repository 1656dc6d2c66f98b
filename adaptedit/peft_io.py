"""PEFT LoRA folders in and out.

    PEFT_DIR/adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules",
                                          "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                                          "fan_in_fan_out", "base_model_name_or_path", ...}
    PEFT_DIR/adapter_model.safetensors  base_model.model.<module>.lora_A.weight (r × in)
                                        base_model.model.<module>.lora_B.weight (out × r)
                                        base_model.model.<module>.lora_magnitude_vector (out, DoRA)

PEFT's update of a module is ΔW = s · B A with s = α/r (α/√r with rsLoRA), r and α per module from
``rank_pattern``/``alpha_pattern`` (the first pattern key K with ``re.match(f"(.*\\.)?({K})$", name)``).
For GPT-2's Conv1D, ``fan_in_fan_out`` is true but lora_A/lora_B keep the (r × in)/(out × r) layout.

Export. Each method states its PEFT mapping (``PEFT`` in its file, see
:mod:`adaptedit.methods.base`) or why there is none; the low-rank family's is
:mod:`adaptedit.methods.peft_lora` (LoRA as itself, the others as an exact concatenated LoRA).

Import. A LoRA/DoRA folder becomes an Adapter with method "lora" (B₀ = 0), ``source="peft"`` and no
fingerprints (PEFT records none). A folder saved with an ``init_lora_weights`` that rewrites the base
(PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: :func:`adaptedit.methods.peft_init_rewrites_base`) is refused: its factors
apply to W − s·B₀A₀, and the fix is PEFT's ``path_initial_model_for_weight_conversion``. Only safetensors weights are read; ``adapter_model.bin`` (pickle) is
refused.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from adaptedit import __version__, checks
from adaptedit.adapter import Adapter, AdapterConfig, ModuleInfo
from adaptedit.atomic import check_output, write_atomic_dir
from adaptedit.errors import AdapteditError
from adaptedit.methods import peft_init_rewrites_base
from adaptedit.methods.peft_lora import PREFIX, pattern_key

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------------------------
# export


def peft_base_ref(adapter: Adapter, base: str | None = None) -> str | None:
    """The ``base_model_name_or_path`` to record: ``base`` if given, else the adapter's base
    folder's path (a local folder) or its reference (a hub id, GGUF file ...)."""
    if base:
        return base
    rec = adapter.config.base
    if rec.get("kind") not in ("folder", None):
        return rec.get("ref")
    return rec.get("path") or rec.get("ref")


def export_peft(adapter: Adapter, out: Path, *, force: bool = False,
                base_ref: str | None = None) -> dict:
    """Write ``adapter`` as a PEFT folder that PeftModel.from_pretrained loads on the base, through
    the method's PEFT mapping (refused, with the method's reason, where there is none)."""
    from safetensors.torch import save_file

    check_output(out, inputs=[adapter.path], force=force)
    checks.adapter_tensors(adapter)  # the checks of every command that reads an adapter
    flat, fields, summary = adapter.method.peft().export(adapter)
    config = {"peft_type": fields.pop("peft_type"), "task_type": None,
              "base_model_name_or_path": base_ref or adapter.config.base.get("ref"),
              **fields, "modules_to_save": None, "inference_mode": True, "revision": None}

    def write(tmp: Path):
        # provenance in the tensors file: an unknown key in adapter_config.json makes PEFT warn
        origin = {"method": adapter.config.method, "source": adapter.config.source,
                  "version": __version__}
        save_file(flat, str(tmp / WEIGHTS),
                  metadata={"format": "pt", "adaptedit": json.dumps(origin)})
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    write_atomic_dir(Path(out), write, force=force)
    return {"out": str(out), "modules": len(adapter.config.modules),
            "method": adapter.config.method, "dora": adapter.config.dora, **summary,
            "base_model_name_or_path": config["base_model_name_or_path"]}


# ----------------------------------------------------------------------------------------------
# import


def import_peft(folder: str | Path) -> Adapter:
    """Read a PEFT LoRA/DoRA folder as an adaptedit Adapter (method "lora")."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapteditError(f"{cfg_path}: unreadable PEFT config ({e})") from None
    checks.peft_config_json(cfg, cfg_path)
    ptype = str(cfg.get("peft_type", "")).upper()
    if ptype != "LORA":
        raise AdapteditError(f"{cfg_path}: PEFT type {ptype or '(none)'} is not supported; "
                             "adaptedit reads PEFT LoRA (and DoRA) adapters only")
    wpath = folder / WEIGHTS
    if not wpath.exists():
        if (folder / "adapter_model.bin").exists():
            raise AdapteditError(f"{folder}: only adapter_model.bin (pickle) is present; adaptedit "
                                 "never unpickles. Re-save it with PEFT's save_pretrained("
                                 "safe_serialization=True)")
        raise AdapteditError(f"{folder}: {WEIGHTS} is missing; the PEFT adapter folder is incomplete (copy it again)")
    try:
        flat = load_file(str(wpath))
    except Exception as e:
        raise AdapteditError(f"{wpath}: unreadable ({str(e).splitlines()[0][:200]})") from None
    if cfg.get("modules_to_save"):
        raise AdapteditError(f"{cfg_path}: modules_to_save {cfg['modules_to_save']} (full copies "
                             "of modules) is not supported; only LoRA factors are")
    if cfg.get("lora_bias"):
        raise AdapteditError(f"{cfg_path}: lora_bias=true is not supported")
    init_value = cfg.get("init_lora_weights")
    if peft_init_rewrites_base(init_value):
        raise AdapteditError(
            f"{cfg_path}: init_lora_weights={init_value!r} means the factors apply to PEFT's "
            "rewritten base (W - s*B0A0), not to the original model; re-save the adapter with "
            "PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=DIR) and "
            "import that folder")
    tensors: dict = {}
    suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B",
                ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"}
    for key, value in flat.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suf, name in suffixes.items():
            if k.endswith(suf):
                tensors.setdefault(k[: -len(suf)], {})[name] = value.float()
                break
        else:
            raise AdapteditError(f"{wpath}: tensor {key} is not a LoRA factor (embedding LoRA, "
                                 "biases and saved modules are not supported)")
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora, dora = bool(cfg.get("use_rslora")), bool(cfg.get("use_dora"))
    kind = "conv1d" if cfg.get("fan_in_fan_out") else "linear"
    modules = {}
    for name in sorted(tensors, key=_natural):
        t = tensors[name]
        if "lora_A" not in t or "lora_B" not in t or (dora and "magnitude" not in t):
            missing = [x for x in ("lora_A", "lora_B") + (("magnitude",) if dora else ())
                       if x not in t]
            raise AdapteditError(f"{wpath}: module {name} lacks {', '.join(missing)}")
        a, b = t["lora_A"], t["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapteditError(f"{wpath}: {name} factors {tuple(b.shape)} @ {tuple(a.shape)} "
                                 "do not multiply")
        rk = pattern_key(rank_pattern, name)
        ak = pattern_key(alpha_pattern, name)
        r = int(rank_pattern[rk]) if rk is not None else r0
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha0
        if r != a.shape[0]:
            raise AdapteditError(f"{cfg_path}: module {name} has rank {a.shape[0]} in the weights "
                                 f"but {r} in the config")
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        modules[name] = ModuleInfo(kind=kind, shape=[int(b.shape[0]), int(a.shape[1])], rank=r,
                                   alpha=alpha, scaling=scaling, key=f"{name}.weight",
                                   fingerprint="")
    if not modules:
        raise AdapteditError(f"{wpath}: no LoRA factors found")
    base_ref = cfg.get("base_model_name_or_path") or ""
    is_dir = bool(base_ref) and Path(base_ref).expanduser().is_dir()
    config = AdapterConfig(
        method="lora", rank=r0, alpha=alpha0, dora=dora, rslora=rslora,
        base={"ref": base_ref, "path": str(Path(base_ref).expanduser()) if is_dir else "",
              "kind": "folder" if is_dir else "hub"},
        modules=modules, targets=",".join(sorted({n.rsplit(".", 1)[-1] for n in modules})),
        rank_pattern=dict(rank_pattern), source="peft",
        init={"peft": {k: cfg.get(k) for k in ("init_lora_weights", "lora_dropout",
                                                "target_modules", "alpha_pattern")}},
    )
    return Adapter(config, {n: tensors[n] for n in modules}, folder)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
