"""The native adapter: a folder that describes itself.

    ADAPTER_DIR/
      adaptedit.json         format version, method, ranks, scalings, targets, base reference,
                             per-module fingerprints of the base weights, SVD settings, provenance
      adapter.safetensors    θ and θ₀ per module: "{module}.lora_A", "{module}.lora_A0", ...

Tensor names per module (all float32):
    lora_A (r × in), lora_B (out × r)            trained low-rank factors
    lora_A0, lora_B0                              their frozen initial values (absent for LoRA: B₀ = 0)
    magnitude, magnitude0 (out)                   DoRA
    delora_lambda, delora_lambda0 (1), delora_wnorm (in)   DeLoRA

ΔW and W' of a module come from the method's functions (:mod:`adaptedit.methods.base`) through
:meth:`Adapter.delta_w`, :meth:`Adapter.merged` and :meth:`Adapter.factors`; everything downstream
(merge, export, inspect) goes through these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adaptedit import __version__, checks, methods
from adaptedit.atomic import write_atomic_dir
from adaptedit.errors import AdapteditError
from adaptedit.targets import Target

FORMAT_VERSION = 1
CONFIG_NAME = "adaptedit.json"
TENSORS_NAME = "adapter.safetensors"


@dataclass
class ModuleInfo:
    """The record of one adapted module in adaptedit.json: its :class:`Target` (kind, shape, key,
    has_bias — stored flat, the file format) and the adapter's numbers for it. One conversion each
    way: :meth:`of` and :meth:`target`."""

    kind: str  # "linear" | "conv1d"
    shape: list  # [out, in]
    rank: int
    alpha: float
    scaling: float
    key: str  # the base weight's key in the checkpoint
    fingerprint: str
    has_bias: bool = False
    captured_energy: float | None = None  # SVD methods: fraction of exact top-r energy captured

    @classmethod
    def of(cls, t: Target, **numbers) -> "ModuleInfo":
        """The record of target ``t`` with the adapter's ``numbers`` (rank, alpha, scaling, ...)."""
        return cls(kind=t.kind, shape=[t.out_features, t.in_features], key=t.key,
                   has_bias=t.has_bias, **numbers)

    def target(self, name: str) -> Target:
        """The :class:`Target` this record describes (module ``name``)."""
        return Target(name, self.kind, int(self.shape[0]), int(self.shape[1]), self.key,
                      self.has_bias)


@dataclass
class AdapterConfig:
    method: str
    rank: int
    alpha: float
    base: dict  # {"ref": str, "path": str, "kind": str}
    modules: dict  # name -> ModuleInfo
    dora: bool = False
    rslora: bool = False
    targets: str = "all-linear"
    rank_pattern: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)  # svd kind, niter, oversample, seed, device, lambda
    training: dict = field(default_factory=dict)  # provenance written by `train`
    source: str = "adaptedit"  # or "peft" for an imported PEFT adapter
    format_version: int = FORMAT_VERSION
    adaptedit_version: str = __version__

    def to_json(self) -> dict:
        d = asdict(self)
        d["modules"] = {k: asdict(v) if isinstance(v, ModuleInfo) else v
                        for k, v in self.modules.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "AdapterConfig":
        d = dict(d)
        fields = set(ModuleInfo.__dataclass_fields__)  # keys of a newer version are dropped
        d["modules"] = {k: ModuleInfo(**{f: x for f, x in v.items() if f in fields})
                        for k, v in d["modules"].items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Adapter:
    config: AdapterConfig
    tensors: dict  # module name -> {tensor name -> tensor}
    path: Path | None = None

    @property
    def method(self):
        """The registry entry (with DoRA on top when the adapter has it)."""
        return methods.resolve(self.config.method, self.config.dora)

    @property
    def names(self) -> list[str]:
        return list(self.config.modules)

    def terms(self, name: str, t: dict | None = None) -> list | None:
        """ΔW of ``name`` as [(coef, B, A), ...] (None when not a sum of low-rank terms);
        ``t`` overrides the stored tensors (training)."""
        return self.method.terms(t if t is not None else self.tensors[name],
                                 self.config.modules[name])

    def trainable_names(self) -> tuple:
        return self.method.TRAINABLE

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ΔW as P @ Q, P: out × k, Q: k × in, float32; None when ΔW has no known low-rank form."""
        return self.method.factors(self.tensors[name], self.config.modules[name])

    def delta_w(self, name: str, w: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = W' − W for one module, float32, (out × in). Methods that are not a sum of low-rank
        terms (DoRA, the orthogonal family) need the base ``w`` (out × in)."""
        return self.method.delta(w, self.tensors[name], self.config.modules[name])

    def merged(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """W' of one module in float32 from the base ``w`` (out × in)."""
        return self.method.merged(w, self.tensors[name], self.config.modules[name])

    def is_identity(self, name: str) -> bool:
        """True when the module's θ still equals θ₀ (F(W, θ₀) = W by construction, so ΔW = 0)."""
        return self.method.is_identity(self.tensors[name])

    def save(self, folder: Path, *, force: bool = True) -> None:
        save_adapter(self, folder, force=force)


def flat_tensors(adapter: Adapter) -> dict:
    return {f"{m}.{k}": v.detach().float().contiguous().cpu()
            for m, ts in adapter.tensors.items() for k, v in ts.items()}


def write_adapter_files(adapter: Adapter, folder: Path) -> None:
    from safetensors.torch import save_file

    save_file(flat_tensors(adapter), str(Path(folder) / TENSORS_NAME),
              metadata={"format": "pt", "adaptedit": str(FORMAT_VERSION)})
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(adapter.config.to_json(), indent=2) + "\n")


def save_adapter(adapter: Adapter, folder: Path, *, force: bool = True,
                 extra_files: dict | None = None) -> None:
    """Write the adapter folder atomically. ``extra_files`` maps file names to bytes/str to add."""
    def write(tmp: Path):
        write_adapter_files(adapter, tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    write_atomic_dir(folder, write, force=force)


def read_adapter(folder: Path) -> Adapter:
    """Read a native adaptedit adapter folder (:func:`adaptedit.formats.load_adapter` reads any)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapteditError(f"{cfg_path}: not valid JSON ({e}); the file is damaged: restore it "
                             "or run init again") from None
    except OSError as e:
        raise AdapteditError(f"{cfg_path}: cannot read ({e.strerror or e})") from None
    checks.config_json(raw, cfg_path)
    config = AdapterConfig.from_json(raw)
    if config.format_version > FORMAT_VERSION:
        raise AdapteditError(f"{cfg_path}: format version {config.format_version} is newer than "
                             f"this adaptedit ({__version__}) reads; upgrade adaptedit")
    if config.method not in methods.METHODS:
        raise AdapteditError(f"{cfg_path}: unknown method {config.method!r}; this adaptedit "
                             f"({__version__}) knows {', '.join(methods.METHODS)}")
    tpath = folder / TENSORS_NAME
    if not tpath.exists():
        raise AdapteditError(f"{folder}: {TENSORS_NAME} is missing; the adapter folder is incomplete (copy it again or rerun init)")
    try:
        flat = load_file(str(tpath))
    except (SafetensorError, OSError, Exception) as e:
        raise AdapteditError(f"{tpath}: unreadable ({str(e).splitlines()[0][:200]})") from None
    tensors: dict = {name: {} for name in config.modules}
    for key, value in flat.items():
        for name in _split_candidates(key):
            if name in tensors:
                tensors[name][key[len(name) + 1:]] = value
                break
        else:
            raise AdapteditError(f"{tpath}: tensor {key} belongs to no module in {CONFIG_NAME}")
    adapter = Adapter(config, tensors, folder)
    for name, info in config.modules.items():
        need = set(adapter.trainable_names())
        missing = need - set(tensors[name])
        if missing:
            raise AdapteditError(f"{tpath}: module {name} lacks {', '.join(sorted(missing))}")
    checks.adapter_tensors(adapter)
    for name, info in config.modules.items():
        problem = adapter.method.validate(tensors[name], info)
        if problem:
            raise AdapteditError(f"{tpath}: {name} {problem}")
    return adapter


def _split_candidates(key: str):
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])
