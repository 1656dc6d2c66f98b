"""PEFT folders in and out (LoRA/DoRA here; OFT, HRA ... through their method's PEFT mapping).

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
refused. Any other PEFT type is read by the method whose mapping has ``read`` for it
(:func:`adaptedit.methods.peft_reader`), given a :class:`PeftFolder`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

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
    name, revision = _split_revision(base_ref or adapter.config.base.get("ref"))
    config = {"peft_type": fields.pop("peft_type"), "task_type": None,
              "base_model_name_or_path": name,
              **fields, "modules_to_save": None, "inference_mode": True, "revision": revision,
              "auto_mapping": _auto_mapping(adapter)}

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


def _split_revision(ref: str | None) -> tuple[str | None, str | None]:
    """A hub reference ``org/name@rev`` → (``org/name``, ``rev``), PEFT's two config fields (its
    loaders pass ``revision`` to from_pretrained); a local path is kept whole."""
    from adaptedit.models import HUB_ID

    if (not ref or "@" not in ref or not HUB_ID.match(ref) or ref.startswith((".", "/", "~"))
            or Path(ref).expanduser().exists()):
        return ref, None
    name, _, revision = ref.partition("@")
    return name, revision or None


def _auto_mapping(adapter: Adapter) -> dict | None:
    """What PEFT records without a task type so that ``AutoPeftModel*.from_pretrained(folder)`` can
    build the base: its transformers class, from the base's config.json (None for remote code or
    when the folder is not at hand; PeftModel.from_pretrained does not need it)."""
    path = adapter.config.base.get("path")
    try:
        cfg = json.loads((Path(path) / "config.json").read_text()) if path else {}
    except (OSError, ValueError):
        return None
    arch = (cfg.get("architectures") or [None])[0] if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not arch.isidentifier() or cfg.get("auto_map"):
        return None
    return {"base_model_class": arch, "parent_library": "transformers"}


# ----------------------------------------------------------------------------------------------
# import


def import_peft(folder: str | Path) -> Adapter:
    """Read a PEFT adapter folder as an adaptedit Adapter: LoRA/DoRA (method "lora"), or a type
    whose method's PEFT mapping can read it (OFT, HRA, BOFT: :class:`PeftFolder`)."""
    src = PeftFolder(Path(folder))
    return _import_lora(src) if src.reader is None else src.adapter(*src.reader)


class PeftFolder:
    """A PEFT folder being imported: its config, its tensors (keys without ``base_model.model.``),
    and, for the types whose tensors do not give every module's shape, the base it records."""

    def __init__(self, folder: Path):
        from safetensors.torch import load_file

        self.folder, self.cfg_path = folder, folder / CONFIG
        try:
            cfg = json.loads(self.cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AdapteditError(f"{self.cfg_path}: unreadable PEFT config ({e})") from None
        checks.peft_config_json(cfg, self.cfg_path)
        self.cfg = cfg
        self.peft_type = str(cfg.get("peft_type", "")).upper()
        self.reader = None  # (method name, its PEFT mapping) for the types other than LoRA
        if self.peft_type != "LORA":
            from adaptedit.methods import peft_reader

            self.reader = peft_reader(self.peft_type)
            if self.reader is None:
                raise AdapteditError(f"{self.cfg_path}: PEFT type {self.peft_type or '(none)'} is "
                                     "not supported; adaptedit reads PEFT LoRA/DoRA, OFT, BOFT and "
                                     "HRA adapters")
        wpath = self.wpath = folder / WEIGHTS
        if not wpath.exists():
            if (folder / "adapter_model.bin").exists():
                raise AdapteditError(f"{folder}: only adapter_model.bin (pickle) is present; "
                                     "adaptedit never unpickles. Re-save it with PEFT's "
                                     "save_pretrained(safe_serialization=True)")
            raise AdapteditError(f"{folder}: {WEIGHTS} is missing; the PEFT adapter folder is "
                                 "incomplete (copy it again)")
        try:
            raw = load_file(str(wpath))
        except Exception as e:
            raise AdapteditError(f"{wpath}: unreadable ({str(e).splitlines()[0][:200]})") from None
        self.flat = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
        if cfg.get("modules_to_save"):
            raise AdapteditError(f"{self.cfg_path}: modules_to_save {cfg['modules_to_save']} (full "
                                 "copies of modules) is not supported; only adapter weights are")
        self.base_ref = cfg.get("base_model_name_or_path") or ""
        revision = cfg.get("revision")  # PEFT loads the base at this revision
        if (revision and isinstance(revision, str) and self.base_ref and "@" not in self.base_ref
                and not Path(self.base_ref).expanduser().exists()):
            self.base_ref = f"{self.base_ref}@{revision}"
        self._targets = None

    def refuse(self, key: str, why: str):
        """Raise the one-line refusal of a config key."""
        raise AdapteditError(f"{self.cfg_path}: {key}={json.dumps(self.cfg.get(key))}: {why}")

    def targets(self) -> dict:
        """{module name: Target} of the recorded base (read from its headers, once)."""
        if self._targets is None:
            from adaptedit.models import resolve

            try:
                self._targets = {t.name: t for t in resolve(self.base_ref or None).targets}
            except AdapteditError as e:
                raise AdapteditError(
                    f"{self.cfg_path}: PEFT's {self.peft_type} weights do not give the modules' "
                    f"output sizes, so the base is read, but base_model_name_or_path "
                    f"{self.base_ref!r} cannot be ({e}); set it to the base model's folder or hub "
                    "id") from None
        return self._targets

    def target(self, name: str, in_features: int | None = None):
        """The base's Linear module ``name`` (refused when absent, a Conv1D, or of another width)."""
        t = self.targets().get(name)
        if t is None:
            raise AdapteditError(f"{self.wpath}: module {name} is not an adaptable module of base "
                                 f"{self.base_ref}; was the adapter made for another model?")
        if t.kind != "linear":
            raise AdapteditError(f"{self.wpath}: module {name} of base {self.base_ref} is a "
                                 f"{t.kind}, which PEFT's {self.peft_type} does not wrap")
        if in_features is not None and t.in_features != in_features:
            raise AdapteditError(f"{self.wpath}: module {name} has {in_features} inputs in the "
                                 f"adapter but {t.in_features} in base {self.base_ref}; was the "
                                 "adapter made for another model?")
        return t

    def base_record(self) -> dict:
        ref = self.base_ref
        is_dir = bool(ref) and Path(ref).expanduser().is_dir()
        return {"ref": ref, "path": str(Path(ref).expanduser()) if is_dir else "",
                "kind": "folder" if is_dir else "hub"}

    def adapter(self, method: str, mapping) -> Adapter:
        """The Adapter of a non-LoRA type, from ``mapping.read(self)`` → (modules, tensors, init)."""
        modules, tensors, init = mapping.read(self)
        if not modules:
            raise AdapteditError(f"{self.wpath}: no {self.peft_type} weights found")
        order = sorted(modules, key=_natural)
        ranks = {modules[n].rank for n in order}
        config = AdapterConfig(
            method=method, rank=ranks.pop() if len(ranks) == 1 else 0, alpha=1.0,
            base=self.base_record(), modules={n: modules[n] for n in order},
            targets=",".join(sorted({n.rsplit(".", 1)[-1] for n in modules})), source="peft",
            init={**init, "peft": {k: self.cfg.get(k) for k in sorted(self.cfg)
                                   if k not in ("base_model_name_or_path", "auto_mapping")}})
        ad = Adapter(config, {n: tensors[n] for n in order}, self.folder)
        for name in order:
            problem = ad.method.validate(tensors[name], modules[name])
            if problem:
                raise AdapteditError(f"{self.wpath}: {name} {problem}")
        return ad


def _import_lora(src: PeftFolder) -> Adapter:
    cfg, cfg_path, wpath, flat = src.cfg, src.cfg_path, src.wpath, src.flat
    if cfg.get("lora_bias"):
        raise AdapteditError(f"{cfg_path}: lora_bias=true is not supported")
    if cfg.get("alora_invocation_tokens"):
        src.refuse("alora_invocation_tokens", "an activated LoRA (aLoRA) changes only the tokens "
                   "from its invocation sequence on, so it has no weight update to merge (PEFT "
                   "refuses to merge it too) and read as plain LoRA it would change every token")
    if cfg.get("layer_replication"):
        src.refuse("layer_replication", "PEFT builds a deeper model from repeated base layers, so "
                   "the adapter's layer indices are not the base's; adaptedit adapts the base's "
                   "own layers")
    if cfg.get("use_bdlora"):
        src.refuse("use_bdlora", "block-diagonal LoRA factors (BD-LoRA) are not supported")
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
    for k, value in flat.items():
        for suf, name in suffixes.items():
            if k.endswith(suf):
                tensors.setdefault(k[: -len(suf)], {})[name] = value.float()
                break
        else:
            raise AdapteditError(f"{wpath}: tensor {PREFIX}{k} is not a LoRA factor (embedding LoRA, "
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
    config = AdapterConfig(
        method="lora", rank=r0, alpha=alpha0, dora=dora, rslora=rslora, base=src.base_record(),
        modules=modules, targets=",".join(sorted({n.rsplit(".", 1)[-1] for n in modules})),
        rank_pattern=dict(rank_pattern), source="peft",
        init={"peft": {k: cfg.get(k) for k in ("init_lora_weights", "lora_dropout",
                                                "target_modules", "alpha_pattern")}},
    )
    return Adapter(config, {n: tensors[n] for n in modules}, src.folder)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
