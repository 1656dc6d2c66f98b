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

ΔW for a module is always Σ coef · B @ A over :func:`terms` (plus DoRA's magnitude, see
:func:`delta_w`); everything downstream (merge, export, inspect) goes through these two functions.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from adaptedit import __version__, methods
from adaptedit.errors import AdapteditError
from adaptedit.methods import dora
from adaptedit.targets import Target

FORMAT_VERSION = 1
CONFIG_NAME = "adaptedit.json"
TENSORS_NAME = "adapter.safetensors"


@dataclass
class ModuleInfo:
    kind: str  # "linear" | "conv1d"
    shape: list  # [out, in]
    rank: int
    alpha: float
    scaling: float
    key: str  # the base weight's key in the checkpoint
    fingerprint: str
    has_bias: bool = False
    captured_energy: float | None = None  # SVD methods: fraction of exact top-r energy captured


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
        d["modules"] = {k: ModuleInfo(**v) for k, v in d["modules"].items()}
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Adapter:
    config: AdapterConfig
    tensors: dict  # module name -> {tensor name -> tensor}
    path: Path | None = None

    @property
    def method(self):
        return methods.get(self.config.method)

    @property
    def names(self) -> list[str]:
        return list(self.config.modules)

    def terms(self, name: str, t: dict | None = None) -> list:
        """ΔW of ``name`` as [(coef, B, A), ...]; ``t`` overrides the stored tensors (training)."""
        info = self.config.modules[name]
        return self.method.terms(t if t is not None else self.tensors[name], info.scaling, info.rank)

    def trainable_names(self) -> tuple:
        return tuple(self.method.TRAINABLE) + (dora.TRAINABLE if self.config.dora else ())

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW (without DoRA's magnitude) as P @ Q, P: out × k, Q: k × in, float32."""
        ts = self.terms(name)
        p = torch.cat([c * b.float() for c, b, _ in ts], dim=1)
        q = torch.cat([a.float() for _, _, a in ts], dim=0)
        return p, q

    def delta_w(self, name: str, w: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = W' − W for one module, float32, (out × in). DoRA needs the base ``w`` (out × in)."""
        d = lowrank_delta(self.terms(name))
        if self.config.dora:
            if w is None:
                raise ValueError("DoRA's ΔW needs the base weight")
            w = w.float()
            d = dora.merged(w, d, self.tensors[name]["magnitude"].float()) - w
        return d

    def save(self, folder: Path, *, force: bool = True) -> None:
        save_adapter(self, folder, force=force)


def lowrank_delta(terms: list) -> torch.Tensor:
    """Σ coef · B @ A in float32. Each product is computed on its own, so that B = B₀, A = A₀ gives
    exactly zero (the products are bit-identical and their difference is 0)."""
    out = None
    for coef, b, a in terms:
        prod = (b.float() @ a.float()).mul_(coef)  # in place: same bits as (B @ A) * coef
        out = prod if out is None else out + prod
    return out


def write_atomic_dir(folder: Path, write, *, force: bool) -> None:
    """Create ``folder`` by calling ``write(tmpdir)`` then renaming: never a half-written folder.

    With ``force`` an existing folder is replaced only after the new one is complete.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AdapteditError(f"{folder}: exists and is not a folder; choose another output path")
    if folder.exists() and not force:
        raise AdapteditError(f"{folder}: already exists; pass --force to replace it")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as e:
        raise AdapteditError(f"{folder}: cannot create a folder in {folder.parent} "
                             f"({e.strerror or e}); choose another output path") from None
    try:
        write(tmp)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)  # the user's folder back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdapteditError(f"{folder}: cannot write ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def load_adapter(folder: str | Path) -> Adapter:
    """Load a native adaptedit adapter, or import a PEFT LoRA/DoRA folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise AdapteditError(f"{folder}: no such adapter folder")
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.exists():
        if (folder / "adapter_config.json").exists():
            from adaptedit.peft_io import import_peft

            return import_peft(folder)
        raise AdapteditError(f"{folder}: not an adapter folder (no {CONFIG_NAME} or "
                             "adapter_config.json)")
    try:
        raw = json.loads(cfg_path.read_text())
        config = AdapterConfig.from_json(raw)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise AdapteditError(f"{cfg_path}: invalid adapter config ({e})") from None
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
        a = tensors[name]["lora_A"]
        if a.shape[-1] != info.shape[1] or tensors[name]["lora_B"].shape[0] != info.shape[0]:
            raise AdapteditError(f"{tpath}: {name} factors {tuple(tensors[name]['lora_B'].shape)} @ "
                                 f"{tuple(a.shape)} do not match the module shape {info.shape}")
    return adapter


def _split_candidates(key: str):
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def check_base(adapter: Adapter, source, *, names=None, verify_weights: bool = True) -> dict:
    """Refuse a base whose targeted weights differ from the ones the adapter was made for.

    Returns {module name: Target} for the adapter's modules in this base. Streaming commands pass
    ``verify_weights=False`` and call :func:`check_weight` on each tensor as they read it.
    """
    from adaptedit.targets import adaptable

    ckpt = source.checkpoint
    found = {t.name: t for t in adaptable(source.meta_model(), ckpt.keys())}
    for name in names or adapter.names:
        info = adapter.config.modules[name]
        t = found.get(name)
        if t is None:
            raise AdapteditError(f"adapter {adapter.path}: module {name} does not exist in base "
                                 f"{source.ref}; was it made for another architecture?")
        if [t.out_features, t.in_features] != list(info.shape):
            raise AdapteditError(f"adapter {adapter.path}: {name} is {info.shape[0]}×{info.shape[1]}"
                                 f" but base {source.ref} has {t.out_features}×{t.in_features}")
        if verify_weights:
            check_weight(adapter, name, ckpt.get(t.key), source.ref)
    return found


def check_weight(adapter: Adapter, name: str, weight: torch.Tensor, base_ref: str) -> None:
    """Compare one base weight (as stored) with the fingerprint recorded at init."""
    from adaptedit.linalg import fingerprint

    info = adapter.config.modules[name]
    if info.fingerprint and fingerprint(weight) != info.fingerprint:
        made_for = adapter.config.base.get("ref", "?")
        raise AdapteditError(f"adapter {adapter.path} was made for base {made_for}, but the weight "
                             f"{info.key} of {base_ref} differs; pass the right --base")


def base_for(adapter: Adapter, base: str | None, *, quiet: bool = True):
    """The base model source: --base if given, else the one recorded in the adapter."""
    from adaptedit.models import resolve

    ref = base or adapter.config.base.get("ref")
    if not ref:
        raise AdapteditError(f"adapter {adapter.path} does not record its base model; pass --base")
    path = adapter.config.base.get("path")
    if base is None and path and Path(path).is_dir() and adapter.config.base.get("kind") == "folder":
        ref = path
    return resolve(ref, quiet=quiet)


def module_target(name: str, info: ModuleInfo) -> Target:
    return Target(name, info.kind, info.shape[0], info.shape[1], info.key, info.has_bias)


def recorded_targets(adapter: Adapter, source) -> dict:
    """{module: Target} from the adapter's record checked against the checkpoint headers.

    Native adapters record each weight's checkpoint key, so no transformers model is built (that
    import alone costs seconds). When a key is not in the checkpoint (e.g. a PEFT adapter whose
    module names differ from the keys by the model's prefix), the module tree decides.
    """
    ckpt = source.checkpoint
    found = {}
    for name, info in adapter.config.modules.items():
        if info.key not in ckpt:
            return check_base(adapter, source, verify_weights=False)
        stored = tuple(ckpt.shape(info.key))
        expect = tuple(info.shape) if info.kind == "linear" else tuple(info.shape[::-1])
        if stored != expect:
            raise AdapteditError(f"adapter {adapter.path}: {name} is {info.shape[0]}×{info.shape[1]}"
                                 f" but {info.key} of base {source.ref} is stored as "
                                 f"{'×'.join(map(str, stored))}; was it made for another model?")
        found[name] = module_target(name, info)
    return found
