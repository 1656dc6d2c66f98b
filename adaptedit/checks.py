"""One validation path for everything read from disk or typed by the user.

Every command that reads an adapter gets it through :func:`adaptedit.adapter.load_adapter`, which
runs :func:`config_json` on adaptedit.json (or :func:`peft_config_json` on a PEFT
adapter_config.json) and :func:`adapter_tensors` on the tensors: a damaged or hand-edited folder is
refused with one line naming the file, the field and the fix, never a Python exception.
"""

from __future__ import annotations

import math
import re

import torch

from adaptedit.errors import AdapteditError, UsageError

SEED_MAX = 2**32 - 1  # every seed is mixed into larger numbers (data order, dare masks)
KINDS = ("linear", "conv1d")


def seed(value: int, option: str = "--seed") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise UsageError(f"{option} {value}: must be an integer from 0 to {SEED_MAX}")
    return value


def finite(value: float | None, option: str) -> None:
    if value is not None and not math.isfinite(value):
        raise UsageError(f"{option} {value}: must be a finite number")


# ------------------------------------------------------------------------------- JSON field types


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_TYPES = {"int": (_is_int, "an integer"), "num": (_is_num, "a finite number"),
          "str": (lambda v: isinstance(v, str), "a string"),
          "bool": (lambda v: isinstance(v, bool), "true or false"),
          "dict": (lambda v: isinstance(v, dict), "an object"),
          "str?": (lambda v: v is None or isinstance(v, str), "a string or null")}

CONFIG_FIELDS = {"method": "str", "rank": "int", "alpha": "num", "base": "dict", "modules": "dict",
                 "dora": "bool", "rslora": "bool", "targets": "str", "rank_pattern": "dict",
                 "init": "dict", "training": "dict", "source": "str", "format_version": "int",
                 "adaptedit_version": "str"}
REQUIRED = ("method", "rank", "alpha", "base", "modules")
MODULE_FIELDS = {"kind": "str", "shape": "shape", "rank": "int", "alpha": "num", "scaling": "num",
                 "key": "str", "fingerprint": "str", "has_bias": "bool"}


def _bad(path, field: str, value, what: str, fix: str):
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    raise AdapteditError(f"{path}: {field} is {shown}, expected {what}; {fix}")


def config_json(raw, path) -> None:
    """Types of every field of adaptedit.json (the file is damaged or edited by hand otherwise)."""
    fix = "the file is damaged or was edited by hand: restore it or run init again"
    if not isinstance(raw, dict):
        raise AdapteditError(f"{path}: expected a JSON object, got {type(raw).__name__}; {fix}")
    for key in REQUIRED:
        if key not in raw:
            raise AdapteditError(f"{path}: the field {key!r} is missing; {fix}")
    for key, kind in CONFIG_FIELDS.items():
        if key in raw and raw[key] is not None or key in REQUIRED:
            ok, what = _TYPES[kind]
            if not ok(raw.get(key)):
                _bad(path, key, raw.get(key), what, fix)
    if raw["rank"] < 1:
        _bad(path, "rank", raw["rank"], "a positive integer", fix)
    for name, info in raw["modules"].items():
        if not isinstance(info, dict):
            _bad(path, f"modules.{name}", info, "an object", fix)
        for key, kind in MODULE_FIELDS.items():
            if key not in info:
                if key == "has_bias":
                    continue
                raise AdapteditError(f"{path}: modules.{name} lacks {key!r}; {fix}")
            v = info[key]
            if kind == "shape":
                if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)):
                    _bad(path, f"modules.{name}.shape", v, "[out, in] (two positive integers)", fix)
                continue
            ok, what = _TYPES[kind]
            if not ok(v):
                _bad(path, f"modules.{name}.{key}", v, what, fix)
        if info["kind"] not in KINDS:
            _bad(path, f"modules.{name}.kind", info["kind"], " or ".join(KINDS), fix)
        if info["rank"] < 1:
            _bad(path, f"modules.{name}.rank", info["rank"], "a positive integer", fix)


def peft_config_json(raw, path) -> None:
    """Types of the adapter_config.json fields adaptedit reads."""
    fix = "fix the file (PEFT writes it with save_pretrained)"
    if not isinstance(raw, dict):
        raise AdapteditError(f"{path}: expected a JSON object, got {type(raw).__name__}; {fix}")
    lora = str(raw.get("peft_type", "")).upper() == "LORA"
    r = raw.get("r")  # OFT/BOFT: r = 0 means "sized by the block size"
    if "r" in raw and not (_is_int(r) and (r > 0 if lora else r >= 0)):
        _bad(path, "r", r, "a positive integer" if lora else "an integer ≥ 0", fix)
    if "lora_alpha" in raw and not (_is_num(raw["lora_alpha"]) and raw["lora_alpha"] > 0):
        _bad(path, "lora_alpha", raw["lora_alpha"], "a finite number", fix)
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            _bad(path, key, raw[key], "true or false", fix)
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        _bad(path, "base_model_name_or_path", base, "a string", fix)
    for key, kind, what in (("rank_pattern", _is_int, "positive integers"),
                            ("alpha_pattern", _is_num, "finite numbers")):
        pat = raw.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            _bad(path, key, pat, f"an object of regular expressions to {what}", fix)
        for k, v in pat.items():
            if not (kind(v) and v > 0):
                _bad(path, f"{key}[{k!r}]", v, what, fix)
            try:
                re.compile(k)
            except re.error as e:
                raise AdapteditError(f"{path}: {key} key {k!r} is not a valid regular "
                                     f"expression ({e}); {fix}") from None


# ------------------------------------------------------------------------------------- tensors


def _expected(name: str, out_f: int, in_f: int, rank: int):
    """The shape each known tensor name must have (None: a name without a fixed shape)."""
    base = name[:-1] if name.endswith("0") else name
    return {"lora_A": (rank, in_f), "lora_B": (out_f, rank), "magnitude": (out_f,),
            "delora_lambda": (1,), "delora_wnorm": (in_f,)}.get(base)


def adapter_tensors(adapter) -> None:
    """Every tensor finite and of the shape the config gives its module (rank r, out × in)."""
    where = f"adapter {adapter.path}"
    for name, info in adapter.config.modules.items():
        out_f, in_f = info.shape
        for key, t in adapter.tensors.get(name, {}).items():
            want = _expected(key, out_f, in_f, info.rank)
            if want is not None and tuple(t.shape) != want:
                got = "×".join(map(str, t.shape)) or "a scalar"
                raise AdapteditError(
                    f"{where}: {name}.{key} is {got} but the module is {out_f}×{in_f} at rank "
                    f"{info.rank}, so it must be {'×'.join(map(str, want))}; the tensors and the "
                    "config do not belong together (copy the whole folder again, or run init again)")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise AdapteditError(
                    f"{where}: {name}.{key} holds NaN or Inf, so the adapter is broken (a "
                    "diverged run?); use an earlier checkpoint (checkpoints/step-N) or run init "
                    "again")


# ----------------------------------------------------------------------------------------------
# model folders


def model_folder(ref: str, path, trust_remote_code: bool) -> None:
    """Refuse a model folder whose stored tensors adaptedit cannot take as the weights, or whose
    loading runs code the user did not allow:

    - a model that needs its own Python code (config.json's auto_map for a model_type this
      transformers does not implement) unless --trust-remote-code was given (models whose code
      was later added to transformers keep their auto_map and load without it);
    - a quantized checkpoint (config.json ``quantization_config``: FP8, GPTQ, AWQ, bitsandbytes
      ...): its tensors are scaled or packed values, which transformers dequantizes or wraps when
      it loads, while adaptedit reads each one as W.
    """
    import json
    from pathlib import Path

    try:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # reported by whoever reads the config
    if not isinstance(raw, dict):
        return
    if raw.get("auto_map") and not trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        mt = raw.get("model_type")
        if mt not in CONFIG_MAPPING_NAMES:
            raise AdapteditError(
                f"{ref}: this model needs its own Python code (config.json has auto_map and "
                f"transformers does not know model_type {str(mt)!r}); pass --trust-remote-code if "
                "you trust it")
    q = raw.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise AdapteditError(f"{ref}: a quantized checkpoint (config.json quantization_config, "
                             f"quant_method {method!r}): its stored tensors are not the weights; "
                             "use the unquantized model")
