"""Which modules an adapter targets: one selection syntax for every command.

    all-linear          every nn.Linear and GPT-2 Conv1D except the output head (default)
    q_proj,v_proj       a comma list of name suffixes (a suffix matches whole name parts)
    re:.*mlp.*          a regular expression matched against the full module name

A :class:`Target` knows its weight's layout: ``nn.Linear`` stores W as (out × in); GPT-2's
``Conv1D`` stores Wᵀ (in × out). Everything in adaptedit works on W (out × in) and converts at
the boundary with :func:`to_w` / :func:`from_w`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from adaptedit.errors import AdapteditError, UsageError

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Target:
    name: str  # module name in the model, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" | "conv1d"
    out_features: int
    in_features: int
    key: str  # the weight's key in the checkpoint
    has_bias: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def module_type(self) -> str:
        """The last name part (q_proj, c_attn, dense ...): used for aggregation and rank patterns."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int | None:
        """The first integer in the name (the block index), or None."""
        m = re.search(r"\.(\d+)\.", f".{self.name}.")
        return int(m.group(1)) if m else None


def layer_kind(module: nn.Module) -> str | None:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def to_w(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """Stored weight → W (out × in)."""
    return weight.t() if kind == "conv1d" else weight


def from_w(w: torch.Tensor, kind: str) -> torch.Tensor:
    """W (out × in) → stored layout (contiguous)."""
    return (w.t() if kind == "conv1d" else w).contiguous()


def adaptable(model: nn.Module, checkpoint_keys=None) -> list[Target]:
    """Every Linear/Conv1D module except the output head, with its checkpoint key."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys = set(checkpoint_keys) if checkpoint_keys is not None else None
    prefix = getattr(model, "base_model_prefix", "") or ""
    renamed = None  # {model key: checkpoint key} of transformers' load-time renames, when needed
    found = []
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or module is head:
            continue
        w = module.weight
        out_f, in_f = (w.shape[1], w.shape[0]) if kind == "conv1d" else (w.shape[0], w.shape[1])
        key = name + ".weight"
        if keys is not None and key not in keys:
            if renamed is None:
                renamed = _renamed_keys(model, keys)
            key = _checkpoint_key(key, keys, prefix) or renamed.get(key)
            if key is None:
                continue  # e.g. a weight the checkpoint does not store
        found.append(Target(name, kind, int(out_f), int(in_f), key, module.bias is not None))
    return found


def _checkpoint_key(key: str, keys: set[str], prefix: str) -> str | None:
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in keys:
        return key[len(prefix) + 1:]
    if prefix and f"{prefix}.{key}" in keys:
        return f"{prefix}.{key}"
    return None


def _renamed_keys(model: nn.Module, keys: set[str]) -> dict[str, str]:
    """{model key: checkpoint key} for the keys transformers renames when it loads this model
    (its checkpoint conversion mapping: e.g. Llava, Gemma 3 and PaliGemma checkpoints store
    ``language_model.model.layers.*`` for the module ``model.language_model.layers.*``, and
    transformers saves them that way). Keys a converter fuses or splits have no one-to-one
    checkpoint key and are left out; {} with a transformers that has no such mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        return {}
    out = {}
    try:  # transformers' internals: a model it cannot map keeps the keys as they are
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
        for key in sorted(keys):
            new, converted = rename_source_key(key, renamings, converters)
            if converted is None and new != key:
                out[new] = key
    except Exception:
        return {}
    return out


def select(candidates: list[Target], spec: str | None) -> list[Target]:
    """Apply a selection spec; an empty selection is an error that lists what exists."""
    spec = ALL_LINEAR if spec is None else spec.strip()
    if not spec:
        raise UsageError("--targets is empty; use all-linear, names such as q_proj,v_proj, "
                         "or re:REGEX")
    if spec == ALL_LINEAR:
        chosen = list(candidates)
    elif spec.startswith("re:"):
        try:
            rx = re.compile(spec[3:])
        except re.error as e:
            raise UsageError(f"--targets {spec!r}: invalid regular expression ({e})") from None
        chosen = [t for t in candidates if rx.fullmatch(t.name)]
    else:
        suffixes = [s.strip() for s in spec.split(",") if s.strip()]
        chosen = [t for t in candidates
                  if any(t.name == s or t.name.endswith("." + s) for s in suffixes)]
    if not chosen:
        types = sorted({t.module_type for t in candidates})
        example = candidates[0].name if candidates else "(none)"
        raise AdapteditError(f"--targets {spec!r} matches no module; module types here: "
                             f"{', '.join(types) or '(none)'} (e.g. {example})")
    return chosen


def parse_pattern(text: str | None, what: str = "--rank-pattern") -> dict[str, float]:
    """'mlp=32,o_proj=8' → {'mlp': 32, 'o_proj': 8}. Keys match name parts or regexes (re:...)."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            if not sep or not key:
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
        except ValueError:
            raise UsageError(f"{what}: {item.strip()!r} is not NAME=NUMBER") from None
        if key in out:
            raise UsageError(f"{what}: {key!r} is given twice")
        if key.startswith("re:"):
            try:
                re.compile(key[3:])
            except re.error as e:
                raise UsageError(f"{what}: {key!r} is not a valid regular expression ({e})"
                                 ) from None
        out[key] = int(v) if v == int(v) else v
    return out


def pattern_unmatched(names: list[str], pattern: dict) -> list[str]:
    """The pattern keys that select none of ``names`` (a typo, or another architecture's names)."""
    return [k for k in pattern if all(pattern_value(n, {k: 0}, None) is None for n in names)]


def pattern_value(name: str, pattern: dict[str, float], default):
    """The value of the most specific (longest) pattern key that matches ``name``."""
    best, best_len = default, -1
    for key, value in pattern.items():
        if key.startswith("re:"):
            hit = re.fullmatch(key[3:], name) is not None
        else:
            hit = f".{key}." in f".{name}." or name.endswith(key)
        if hit and len(key) > best_len:
            best, best_len = value, len(key)
    return best
