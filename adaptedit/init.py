"""Build an adapter for a checkpoint from the checkpoint's own weights (``adaptedit init``).

Weights are read one tensor at a time from the safetensors files; modules of equal shape and rank
are decomposed together in batches (one batched SVD/QR call instead of hundreds of small ones).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from adaptedit import checks, methods
from adaptedit.adapter import Adapter, AdapterConfig, ModuleInfo
from adaptedit.devices import resolve_device
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.linalg import fingerprint, top_energy
from adaptedit.models import ModelSource
from adaptedit.svd_cache import gram_spectra
from adaptedit.targets import (ALL_LINEAR, Target, parse_pattern, pattern_unmatched, pattern_value,
                               select, to_w)

BATCH_BYTES = 256 << 20  # float32 weights decomposed together at most
# The randomized SVD's captured energy Σσ̂²/Σσ² (top r) is measured on every module against the
# exact top-r energy; a module below the floor is decomposed again with more power iterations
# (REFINE_NITER), and with the exact SVD if those do not reach it either. A floor of 0 turns the
# guard off: the fixed sketch, nothing measured (the work PEFT's pissa_niter_K does).
ENERGY_FLOOR = 0.96
REFINE_NITER = (8, 16, 32)
DELORA_LAMBDA = 15.0  # --delora-lambda's default


@dataclass
class InitOptions:
    method: str = "lora"
    rank: int | None = None  # None: the method's default (16; HRA 8; OFT: from the block size)
    alpha: float | None = None
    dora: bool = False
    rslora: bool = False
    targets: str | None = None  # None: the method's default (TARGETS), else all-linear
    rank_pattern: str | None = None
    svd: str = "auto"  # auto | full | randomized
    niter: int = 4
    oversample: int = 8
    seed: int = 0
    device: str = "auto"
    delora_lambda: float = DELORA_LAMBDA  # another value is refused for the other methods
    options: dict = field(default_factory=dict)  # the method's own options given (OPTIONS keys)
    energy_floor: float = ENERGY_FLOOR  # randomized SVD: least captured energy per module; 0: off


def plan(source: ModelSource, opts: InitOptions) -> tuple[list[Target], dict[str, int]]:
    """The targets and their ranks; validates ranks against shapes (names the module)."""
    targets, ranks, _ = plan_options(source, opts)
    return targets, ranks


def plan_options(source: ModelSource, opts: InitOptions) -> tuple[list[Target], dict, dict]:
    """As :func:`plan`, and the method's own options resolved against the targets."""
    method = methods.get(opts.method)  # validates the name before the model is read
    check_rank_applies(opts)
    given = [*opts.options, *(["delora_lambda"] if opts.delora_lambda != DELORA_LAMBDA else [])]
    for key in given:
        if key not in method.OPTIONS:
            owners = [n for n, m in methods.METHODS.items() if key in m.OPTIONS]
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} applies to {', '.join(owners) or 'no method'}, not "
                             f"{opts.method}; drop {flag}")
    candidates = source.targets
    check_stored_shapes(source, candidates)  # all of them: the base must load in train and merge
    try:
        targets = select(candidates, targets_spec(opts))
    except AdapteditError as e:
        if opts.targets is not None:
            raise
        found = str(e).split(" ", 2)[2].replace("matches no module;", "match no module of this model;")
        raise AdapteditError(f"{opts.method}'s default targets ({targets_spec(opts)}) {found}; "
                             "choose them with --targets") from None
    pattern = parse_pattern(opts.rank_pattern)
    unmatched = pattern_unmatched([t.name for t in targets], pattern)
    if unmatched:
        types = sorted({t.module_type for t in targets})
        raise AdapteditError(f"--rank-pattern {unmatched[0]!r} matches none of the targeted modules;"
                             f" module types here: {', '.join(types)}")
    rank_given = opts.rank is not None or bool(pattern)
    default = opts.rank if opts.rank is not None else method.DEFAULT_RANK
    ranks = {}
    for t in targets:
        r = pattern_value(t.name, pattern, default)
        if r is None:
            continue  # the method sizes this module itself (OFT: from the block size)
        if r != int(r) or r <= 0:
            raise UsageError(f"rank {r:g} for {t.name}: the rank must be a positive integer")
        ranks[t.name] = int(r)
    options = {**method.OPTIONS, **opts.options}
    return (targets, *method.plan(targets, ranks, options, rank_given))


def check_rank_applies(opts: InitOptions) -> None:
    """A rank given to a method that has none (IA3, RoAd) is refused, never ignored."""
    if (opts.rank is not None or opts.rank_pattern) and not methods.get(opts.method).RANKED:
        flag = "--rank" if opts.rank is not None else "--rank-pattern"
        raise UsageError(f"{flag} does not apply to {opts.method} (it has no rank); drop {flag}")


def targets_spec(opts: InitOptions) -> str:
    """--targets as given, else the method's default (all-linear for most)."""
    if opts.targets is not None:
        return opts.targets
    return methods.get(opts.method).TARGETS or ALL_LINEAR


def check_stored_shapes(source: ModelSource, targets: list[Target]) -> None:
    """Each target's weight in the checkpoint has the shape config.json gives its module (a
    mismatch would make an adapter that every later command rejects). Targets planned from the
    header carry the stored shapes: config.json's sizes come from families.config_shapes."""
    from adaptedit.families import config_shapes

    ckpt = source.checkpoint
    header = source.plan_source == "header"
    sizes = (config_shapes(source.config_json) or {}) if header else {}
    for t in targets:
        if header:
            want = sizes.get(t.name.split(".", 3)[-1]) or sizes.get(t.name)
            if want is None:
                continue
        else:
            want = (t.out_features, t.in_features)
        stored = tuple(ckpt.shape(t.key))
        expect = want if t.kind == "linear" else want[::-1]
        if stored != tuple(expect):
            raise AdapteditError(
                f"{source.path}: weight {t.key} is stored as {'×'.join(map(str, stored))} but "
                f"config.json makes {t.name} a {want[0]}×{want[1]} {t.kind} layer"
                + ("" if t.kind == "linear" else f" (stored as {'×'.join(map(str, expect))})")
                + "; the weights and config.json disagree: "
                "fetch the model again or fix config.json")


def scaling_for(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def check(opts: InitOptions):
    """The checks of ``opts`` that need no model (one-line errors); returns (method, device)."""
    method = methods.resolve(opts.method, opts.dora)  # refuses DoRA where it is not defined
    if opts.svd not in ("auto", "full", "randomized"):
        raise UsageError(f"--svd {opts.svd!r}: use full, randomized (or auto)")
    if opts.niter < 0 or opts.oversample < 0:
        raise UsageError("--niter and --oversample must be ≥ 0")
    if opts.alpha is not None and not (math.isfinite(opts.alpha) and opts.alpha > 0):
        raise UsageError(f"--alpha {opts.alpha:g}: must be a positive number (scaling = α / r)")
    if not (math.isfinite(opts.delora_lambda) and opts.delora_lambda > 0):
        raise UsageError(f"--delora-lambda {opts.delora_lambda:g}: must be a positive number")
    if not (0.0 <= opts.energy_floor <= 1.0):
        raise UsageError(f"--energy-floor {opts.energy_floor:g}: must be in [0, 1]")
    checks.seed(opts.seed)
    device = resolve_device(opts.device)
    if not method.SCALED and (opts.alpha is not None or opts.rslora):
        flag = "--alpha" if opts.alpha is not None else "--rslora"
        raise UsageError(f"{flag} does not apply to {opts.method} (no scaling α/r); drop {flag}")
    return method, device


def build(source: ModelSource, opts: InitOptions, progress=None) -> Adapter:
    """Compute θ₀ for every target and return the (untrained) adapter."""
    method, device = check(opts)
    targets, ranks, options = plan_options(source, opts)
    # the global rank (α's default follows it): --rank, else the method's default rank, which
    # --rank-pattern leaves unchanged for the modules it does not match
    rank = opts.rank if opts.rank is not None else (method.DEFAULT_RANK
                                                    or min(ranks.values(), default=1))
    alpha = float(opts.alpha) if opts.alpha is not None else method.default_alpha(rank)
    ckpt = source.checkpoint
    gen = torch.Generator().manual_seed(opts.seed)
    svd_kind = _svd_kind(opts, targets)

    groups = defaultdict(list)  # modules of one shape and rank are decomposed together
    for t in targets:
        groups[(t.shape, ranks[t.name])].append(t)

    tensors, infos, energies, refined = {}, {}, {}, {}
    task = progress.add_task("Decomposing" if svd_kind != "none" else "Initialising",
                             total=len(targets)) if progress else None
    for (shape, group_rank), members in groups.items():
        per_batch = max(1, BATCH_BYTES // (4 * shape[0] * shape[1]))
        for i in range(0, len(members), per_batch):
            chunk = members[i:i + per_batch]
            raw = [ckpt.get(t.key) for t in chunk]
            ws = []
            for t, w in zip(chunk, raw):
                w = to_w(w, t.kind).float()
                if not torch.isfinite(w.sum()) and not torch.isfinite(w).all():
                    raise AdapteditError(f"{source.ref}: weight {t.key} contains NaN or Inf; "
                                         "the checkpoint is damaged")
                ws.append(w)
            w = torch.stack(ws).to(device)
            fps = [fingerprint(r) for r in raw]
            scaling = scaling_for(alpha, group_rank, opts.rslora)
            init_opts = {**options, "rank": group_rank, "scaling": scaling, "generator": gen,
                         "svd": svd_kind, "niter": opts.niter, "oversample": opts.oversample,
                         "delora_lambda": opts.delora_lambda, "names": [t.name for t in chunk]}
            out = method.init(w, init_opts)
            s_found = out.pop("_s", None)
            if svd_kind == "randomized" and s_found is not None and opts.energy_floor > 0:
                for j, how in _meet_floor(method, w, group_rank, init_opts, out, s_found, opts,
                                          energies, chunk, fps).items():
                    refined[chunk[j].name] = how
            for j, t in enumerate(chunk):
                tensors[t.name] = {k: v[j].detach().cpu().contiguous() for k, v in out.items()}
                infos[t.name] = ModuleInfo.of(t, rank=group_rank, alpha=alpha, scaling=scaling,
                                              fingerprint=fps[j],
                                              captured_energy=energies.get(t.name))
            if progress:
                progress.advance(task, len(chunk))
    # keep the model's module order, not the grouping order
    order = [t.name for t in targets]
    config = AdapterConfig(
        method=opts.method, rank=rank, alpha=alpha, dora=opts.dora, rslora=opts.rslora,
        base={"ref": source.ref, "path": str(source.path), "kind": source.kind},
        modules={n: infos[n] for n in order}, targets=targets_spec(opts),
        rank_pattern=parse_pattern(opts.rank_pattern),
        init={"svd": svd_kind, "niter": opts.niter, "oversample": opts.oversample,
              "seed": opts.seed, "device": str(device),
              **({"delora_lambda": opts.delora_lambda} if "delora_lambda" in method.OPTIONS
                 else {k: v for k, v in options.items() if v is not None}),
              **(_energy_summary(energies, refined, opts.energy_floor) if energies else {})},
    )
    return Adapter(config, {n: tensors[n] for n in order})


def _meet_floor(method, w, rank, init_opts, out, s_found, opts, energies, chunk, fps) -> dict:
    """Measure the captured energy of every module of a chunk (into ``energies``) against the exact
    top-r energy (the float64 Gram spectrum, cached per weight) and redo those below the floor in
    place in ``out``. Returns {index in chunk: how it was redone}."""
    spectra = gram_spectra(w, fps, [t.kind for t in chunk])
    exact = torch.stack([top_energy(e, rank) for e in spectra]).to(w.device)
    found = (s_found.double() ** 2).sum(-1)
    captured = torch.where(exact > 0, found / exact.clamp_min(1e-300), torch.ones_like(exact))
    redone = {}
    for j, t in enumerate(chunk):
        c = float(captured[j])
        if c < opts.energy_floor:
            for niter in [n for n in REFINE_NITER if n > opts.niter] + ["full"]:
                retry = dict(init_opts, generator=torch.Generator().manual_seed(opts.seed),
                             **({"svd": "full"} if niter == "full" else {"niter": niter}))
                new = method.init(w[j:j + 1], retry)
                c = float((new.pop("_s").double() ** 2).sum() / exact[j]) if exact[j] > 0 else 1.0
                if c >= opts.energy_floor or niter == "full":
                    for k, v in new.items():
                        out[k][j] = v[0]
                    redone[j] = f"niter {niter}" if niter != "full" else "exact SVD"
                    break
        energies[t.name] = min(c, 1.0)  # ≤ 1 up to rounding (an exact SVD can be 1 + 1e-16)
    return redone


def _energy_summary(energies: dict, refined: dict, floor: float) -> dict:
    worst = min(energies, key=energies.get)
    return {"energy_floor": floor, "captured_energy_min": energies[worst],
            "captured_energy_worst_module": worst,
            "captured_energy_mean": sum(energies.values()) / len(energies),
            "energy_refined": refined}


def _svd_kind(opts: InitOptions, targets: list[Target]) -> str:
    need = methods.get(opts.method).SVD  # None: no SVD; "full": exact only; "any"
    if need is None:
        return "none"
    if need == "full":
        return "full"
    if opts.svd == "auto":
        return "randomized" if max(min(t.shape) for t in targets) >= 512 else "full"
    return opts.svd


def parameter_counts(source: ModelSource, adapter: Adapter) -> tuple[int, int]:
    """(trainable adapter parameters, parameters of the base model)."""
    trainable = set(adapter.trainable_names())
    n_adapter = sum(v.numel() for ts in adapter.tensors.values() for k, v in ts.items()
                    if k in trainable)
    ckpt = source.checkpoint
    n_base = sum(math.prod(ckpt.shape(k)) for k in ckpt.keys())
    return n_adapter, n_base
