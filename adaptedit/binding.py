"""An adapter bound to a base model: which base it records, and refusing one it was not made for.

Native adapters record each targeted weight's checkpoint key, shape and fingerprint (a hash of the
weight as stored); :func:`check_base` and :func:`check_weight` compare them with a base before any
command uses it. :func:`recorded_targets` rebuilds the targets from that record without building a
transformers model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from adaptedit.adapter import Adapter
from adaptedit.errors import AdapteditError
from adaptedit.linalg import fingerprint
from adaptedit.models import resolve


BASE_FIX = "pass the right --base"


def check_base(adapter: Adapter, source, *, names=None, verify_weights: bool = True,
               fix: str = BASE_FIX) -> dict:
    """Refuse a base whose targeted weights differ from the ones the adapter was made for.

    Returns {module name: Target} for the adapter's modules in this base. Streaming commands pass
    ``verify_weights=False`` and call :func:`check_weight` on each tensor as they read it.
    """
    ckpt = source.checkpoint
    found = {t.name: t for t in source.targets}
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
            check_weight(adapter, name, ckpt.get(t.key), source.ref, fix=fix)
    return found


def check_weight(adapter: Adapter, name: str, weight: torch.Tensor, base_ref: str, *,
                 fix: str = BASE_FIX) -> None:
    """Compare one base weight (as stored) with the fingerprint recorded at init."""
    info = adapter.config.modules[name]
    if info.fingerprint and fingerprint(weight) != info.fingerprint:
        made_for = adapter.config.base.get("ref", "?")
        raise AdapteditError(f"adapter {adapter.path} was made for base {made_for}, but the weight "
                             f"{info.key} of {base_ref} differs; {fix}")


def base_for(adapter: Adapter, base: str | None, *, quiet: bool = True,
             trust_remote_code: bool = False, fix: str = "put it back, or give the base with --base"):
    """The base model source: --base if given, else the one recorded in the adapter (``fix``: what
    the error says to do when that folder is gone)."""
    ref = base or adapter.config.base.get("ref")
    if not ref:
        raise AdapteditError(f"adapter {adapter.path} does not record its base model; pass --base")
    path = adapter.config.base.get("path")
    if base is None and path and adapter.config.base.get("kind") == "folder":
        if not Path(path).is_dir():
            raise AdapteditError(f"adapter {adapter.path}: its base model folder {path} (recorded "
                                 f"at init) is not there any more (moved or deleted?); {fix}")
        ref = path
    return resolve(ref, quiet=quiet, trust_remote_code=trust_remote_code)


def recorded_targets(adapter: Adapter, source) -> dict:
    """{module: Target} from the adapter's record checked against the checkpoint headers.

    Native adapters record each weight's checkpoint key, so no transformers model is built (that
    import alone costs seconds). When a key is not in the checkpoint (e.g. a PEFT adapter whose
    module names differ from the keys by the model's prefix), the module tree decides.
    """
    ckpt = source.checkpoint
    # PEFT records no keys, and its fan_in_fan_out flag is only a default it overrides per module
    # (Linear or Conv1D): the base's targets give the layout of the modules they hold
    base = {t.name for t in source.targets} if adapter.config.source == "peft" else set()
    found = {}
    for name, info in adapter.config.modules.items():
        if name in base:
            found[name] = check_base(adapter, source, names=[name], verify_weights=False)[name]
            continue
        if info.key not in ckpt:
            return check_base(adapter, source, verify_weights=False)
        stored = tuple(ckpt.shape(info.key))
        expect = tuple(info.shape) if info.kind == "linear" else tuple(info.shape[::-1])
        if stored != expect:
            raise AdapteditError(f"adapter {adapter.path}: {name} is {info.shape[0]}×{info.shape[1]}"
                                 f" but {info.key} of base {source.ref} is stored as "
                                 f"{'×'.join(map(str, stored))}; was it made for another model?")
        found[name] = info.target(name)
    return found
