"""Fold one or more adapters into the base weights and write a deployable checkpoint.

    W' = F(W, θ)          the method's dense W' (adapter.merged), float32, cast once to the output dtype

Streaming: the base is read tensor by tensor (``safe_open``, pread backend when available), the
output is planned from the headers alone (``huggingface_hub.split_torch_state_dict_into_shards`` on
meta tensors) and written one tensor at a time (:mod:`adaptedit.shards`). Peak memory is about one
tensor plus one float32 copy, whatever the model size. Everything goes to a temporary folder next
to OUT, which is renamed only once it is complete and verified (:mod:`adaptedit.verification`).

    merge()  validate → plan (checkpoint key → adapter modules) → stream every tensor through
             _merge_tensor (W + ΔW, cast once) into the shards → side files → verify → rename

Adapters of the same base combine on the dense ΔW of each tensor, so that adapters of different
ranks and methods mix: linear, ties, dare_linear, dare_ties with PEFT's conventions
(:mod:`adaptedit.combine`). ``--combine``/``--density`` apply to a single adapter too.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adaptedit import checks
from adaptedit.adapter import Adapter
from adaptedit.atomic import check_output, write_atomic_dir
from adaptedit.binding import base_for, check_weight, recorded_targets
from adaptedit.combine import COMBINE, combine
from adaptedit.devices import DTYPES
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.models import model_inputs
from adaptedit.shards import (DEFAULT_SHARD, DTYPE_NAMES, config_dtype, open_files, parse_size,
                              read_tensor, write_safetensors, write_side_files)
from adaptedit.targets import from_w, to_w
from adaptedit.verification import fits_in_memory, verify


@dataclass
class MergeOptions:
    weights: list[float] | None = None
    combine: str = "linear"
    density: float = 1.0
    seed: int | None = None  # dare's drop pattern (0 when not given); refused for linear and ties
    dtype: str = "auto"
    max_shard_size: str | int = DEFAULT_SHARD
    verify: bool = True


@dataclass
class MergeResult:
    out: str
    base: str
    adapters: list[str]
    combine: str
    dtype: str
    tensors_merged: int = 0
    tensors_copied: int = 0
    shards: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    verified: bool = False
    max_abs_logit_diff: float | None = None
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# planning


def check_same_base(adapters: list[Adapter]) -> None:
    """Refuse adapters recorded against different bases (by fingerprint where both have one)."""
    first = adapters[0]
    for other in adapters[1:]:
        for name in set(first.names) & set(other.names):
            f1 = first.config.modules[name].fingerprint
            f2 = other.config.modules[name].fingerprint
            if f1 and f2 and f1 != f2:
                raise AdapteditError(
                    f"adapters {first.path} and {other.path} were made for different bases "
                    f"({first.config.base.get('ref')} vs {other.config.base.get('ref')}; weight "
                    f"{first.config.modules[name].key} differs); merge adapters of one base only")


def validate_options(adapters: list[Adapter], opts: MergeOptions) -> list[float]:
    if opts.combine not in COMBINE:
        raise UsageError(f"--combine {opts.combine!r}: choose one of {', '.join(COMBINE)}")
    if not (0.0 < opts.density <= 1.0) or math.isnan(opts.density):
        raise UsageError(f"--density {opts.density:g}: must be in (0, 1]")
    if opts.combine == "linear" and opts.density != 1.0:
        raise UsageError(f"--density {opts.density:g} applies to --combine ties, dare_linear or "
                         "dare_ties; linear keeps every entry (choose one of those or drop --density)")
    if opts.seed is not None:
        checks.seed(opts.seed)
        if not opts.combine.startswith("dare"):
            raise UsageError(f"--seed applies to --combine dare_linear or dare_ties (the random drop "
                             f"pattern); {opts.combine} draws nothing: drop --seed")
    if opts.dtype not in ("auto", *DTYPES):
        raise UsageError(f"--dtype {opts.dtype!r}: choose auto, bf16, fp16 or fp32")
    weights = opts.weights or [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise UsageError(f"--weights has {len(weights)} values for {len(adapters)} adapters; "
                         "give one weight per adapter")
    if any(not math.isfinite(w) for w in weights):
        raise UsageError("--weights: every weight must be a finite number")
    parse_size(opts.max_shard_size)  # a usage error now, before any model is read
    return [float(w) for w in weights]




def module_delta(adapter: Adapter, name: str, w: torch.Tensor) -> torch.Tensor | None:
    """ΔW (float32, out × in) of one module given the base W (out × in); None when exactly zero.

    At θ₀ the reparametrization is the identity by construction, while W' − W computed in floats
    may not be (DoRA's m/‖W‖ rounds to 1 ± ulp): for methods without a low-rank form, "zero" there.
    (Low-rank ΔW is exactly 0 at θ₀ as computed: the products B A and B₀ A₀ are bit-identical.)
    """
    if not adapter.method.has_factors and adapter.is_identity(name):
        return None
    return adapter.delta_w(name, w)


def module_merged(adapter: Adapter, name: str, w: torch.Tensor) -> torch.Tensor | None:
    """W' (float32) of one module for a single adapter; None when W' = W exactly (see above).

    The method's own dense W' (LoRA: W + s·(B@A), the same operations in the same order as PEFT's
    merge; DoRA: m/‖V‖ ⊙ V with V = W + ΔW, not W + (W' − W), which would round twice).
    """
    if not adapter.method.has_factors and adapter.is_identity(name):
        return None
    return adapter.merged(name, w)


# ----------------------------------------------------------------------------------------------
# the merge


def merge(adapters: list[Adapter], out: Path, *, base: str | None = None,
          opts: MergeOptions | None = None, force: bool = False, progress=None,
          trust_remote_code: bool = False) -> MergeResult:
    """Merge ``adapters`` into their base and write the checkpoint folder ``out`` atomically.

    A base that needs its own Python code (auto_map) is refused unless ``trust_remote_code``: the
    verification runs that code, and the merged folder gets a copy of it (checks.model_folder)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from adaptedit.models import resolve

    opts = opts or MergeOptions()
    out = Path(out)
    check_output(out, force, inputs=[a.path for a in adapters])
    weights = validate_options(adapters, opts)
    check_same_base(adapters)
    for ad in adapters:
        checks.adapter_tensors(ad)
    source = (resolve(base, trust_remote_code=trust_remote_code) if base
              else base_for(adapters[0], None, trust_remote_code=trust_remote_code))
    check_output(out, force, inputs=[a.path for a in adapters] + model_inputs(source))
    ckpt = source.checkpoint
    # key -> [(adapter index, module name, Target)]
    plan: dict[str, list] = {}
    for i, ad in enumerate(adapters):
        found = recorded_targets(ad, source)
        for name in ad.names:
            t = found[name]
            plan.setdefault(t.key, []).append((i, name, t))

    keys = ckpt.keys()
    out_dtype = DTYPES[opts.dtype] if opts.dtype != "auto" else None  # None: each tensor's own
    base_dtype = config_dtype(source, ckpt)
    final_dtype = out_dtype or base_dtype

    def target_dtype(key):
        dt = ckpt.dtype(key)
        return out_dtype if (out_dtype is not None and dt.is_floating_point) else dt

    meta = {k: torch.empty(ckpt.shape(k), dtype=target_dtype(k), device="meta") for k in keys}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=parse_size(opts.max_shard_size))
    del meta

    result = MergeResult(out=str(out), base=source.ref, adapters=[str(a.path) for a in adapters],
                         combine=opts.combine if len(adapters) > 1 or opts.combine != "linear" else "single",
                         dtype=DTYPE_NAMES.get(final_dtype, str(final_dtype)))
    start = time.perf_counter()
    handles = open_files(ckpt)
    total_bytes = sum(math.prod(ckpt.shape(k)) * ckpt.dtype(k).itemsize for k in keys)
    task = progress.add_task("Merging", total=total_bytes) if progress else None

    def produce(key: str) -> torch.Tensor:
        raw = read_tensor(handles, ckpt, key)
        if key in plan:
            t = _merge_tensor(adapters, plan[key], raw, key, weights, opts, source.ref,
                              target_dtype(key))
            result.tensors_merged += 1
        else:
            t = raw if raw.dtype == target_dtype(key) else raw.to(target_dtype(key))
            check_finite(key, raw, t, source.ref, merged=False)
            result.tensors_copied += 1
        if progress:
            progress.advance(task, raw.numel() * raw.element_size())
        return t

    def write(tmp: Path):
        for filename, shard_keys in split.filename_to_tensors.items():
            specs = {k: (tuple(ckpt.shape(k)), target_dtype(k)) for k in shard_keys}
            write_safetensors(tmp / filename, specs, produce, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2,
                                                                         sort_keys=True) + "\n")
        write_side_files(source, tmp, final_dtype)
        result.shards = len(split.filename_to_tensors)
        result.output_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        if opts.verify:
            fits, why = fits_in_memory(total_bytes, final_dtype)
            if fits:
                keymap = {name: key for key, es in plan.items() for _, name, _ in es}
                diff, tol = verify(source, tmp, final_dtype,
                                   lambda model: _reference(model, adapters, weights, opts, keymap),
                                   changed=set(plan))
                result.verified, result.max_abs_logit_diff, result.tolerance = True, diff, tol
            else:
                result.notes.append(f"verification skipped: {why}")

    write_atomic_dir(out, write, force=force)  # any OSError: one line, temporary folder removed
    result.seconds = time.perf_counter() - start
    return result


def _plain_single(adapters, weights, opts) -> bool:
    """One adapter at weight 1, linear: merged through the adapter's own W' = F(W, θ) (exact)."""
    return len(adapters) == 1 and weights[0] == 1.0 and opts.combine == "linear"


def _merge_tensor(adapters, entries, raw, key, weights, opts, base_ref, dtype) -> torch.Tensor:
    kind = entries[0][2].kind
    for i, name, _ in entries:
        check_weight(adapters[i], name, raw, base_ref)
    w = to_w(raw, kind).float()  # (out × in)
    if _plain_single(adapters, weights, opts):
        new = module_merged(adapters[0], entries[0][1], w)
    else:
        deltas = [None] * len(adapters)
        for i, name, _ in entries:
            deltas[i] = module_delta(adapters[i], name, w)
        d = combine(deltas, weights, opts.combine, opts.density, opts.seed or 0, key)
        new = None if d is None else w + d
    del w  # keep the peak at raw + one float32 copy + the output
    if new is None:
        out = raw if raw.dtype == dtype else raw.to(dtype)
        check_finite(key, raw, out, base_ref, merged=False)
        return out
    out = from_w(new, kind).to(dtype)
    check_finite(key, new, out, base_ref, merged=True)
    return out


def check_finite(key: str, exact: torch.Tensor, out: torch.Tensor, base_ref: str, *,
                 merged: bool) -> None:
    """Refuse a tensor about to be written with NaN or Inf: ``exact`` is its value before the
    cast to the output dtype, ``out`` the value written. Names the tensor and the cause."""
    if not out.dtype.is_floating_point or bool(torch.isfinite(out).all()):
        return
    if bool(torch.isfinite(exact).all()):
        big = float(exact.float().abs().max())
        name = DTYPE_NAMES.get(out.dtype, str(out.dtype))
        raise AdapteditError(f"{key}: the {'merged ' if merged else ''}weight reaches {big:.6g}, "
                             f"beyond the largest {name} ({torch.finfo(out.dtype).max:.6g}); "
                             "merge with --dtype bf16 or fp32")
    if merged:
        raise AdapteditError(f"{key}: the merged weight has NaN or Inf (the adapter or the base "
                             f"{base_ref} is broken); nothing was written")
    raise AdapteditError(f"base {base_ref}: tensor {key} has NaN or Inf; the checkpoint is damaged "
                         "(fetch it again); nothing was written")


def _reference(model, adapters, weights, opts, keymap: dict) -> None:
    """What verification compares the merged folder with. One adapter (linear, weight 1): the base
    with the adapter attached (layer.attach), an independent path from the merge arithmetic.
    Several: the base with the combined ΔW added in memory (this checks the files: shards, names,
    dtype, tying)."""
    from adaptedit.layer import attach

    if _plain_single(adapters, weights, opts):
        attach(model, adapters[0])
    else:
        _apply_in_memory(model, adapters, weights, opts, keymap)


def _apply_in_memory(model, adapters, weights, opts, keymap: dict) -> None:
    from adaptedit.targets import layer_kind

    modules = dict(model.named_modules())
    names = {n for a in adapters for n in a.names}
    with torch.no_grad():
        for name in names:
            mod = modules[name]
            kind = layer_kind(mod)
            w = to_w(mod.weight, kind).float()
            deltas = [module_delta(a, name, w) if name in a.config.modules else None
                      for a in adapters]
            d = combine(deltas, weights, opts.combine, opts.density, opts.seed or 0, keymap[name])
            if d is not None:
                mod.weight.copy_(from_w(w + d, kind).to(mod.weight.dtype))
