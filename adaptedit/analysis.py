"""`adaptedit inspect`: what an update did to each weight, in geometric terms (DESIGN §4).

Three sources of ΔW = W₁ − W₀, one analysis (:func:`analyze_module`, on :mod:`adaptedit.geometry`):

- an adapter (native or PEFT) on its base: ΔW = P @ Q from ``Adapter.factors`` (never formed
  densely; its SVD comes from the factors), or the dense ΔW = W' − W for methods without a known
  low-rank form (DoRA, the orthogonal family);
- two checkpoints (``--base``, ``--tuned``): ΔW dense, streamed one tensor pair at a time;
- the checkpoints an adapter saved during training (``--trajectory``), or several adapters: the
  cheap metrics (‖ΔW‖, ΔM, ΔD) at every point, the full analysis of the first adapter.

W₀'s SVD comes from :mod:`adaptedit.svd_cache` (computed once per base weight, cached on disk, capped):
exact (LAPACK SVD; all singular values, the top and bottom singular vectors) up to min(out, in) =
``EXACT_MAX``, a seeded randomized top-k beyond (bottom-k energies are then not available and
intruder counts are upper bounds; the accuracy of the sketch is reported).

The result is one JSON-ready dict (schema in docs/inspect.md, version ``SCHEMA_VERSION``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch

from adaptedit import __version__, checks, geometry
from adaptedit.aggregate import aggregate, group, md_correlation, verdict
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.linalg import one_thread_each
from adaptedit.svd_cache import base_svd, best_cos, cache_max
from adaptedit.targets import Target, select, to_w

SCHEMA = "adaptedit.inspect"
SCHEMA_VERSION = 1
SPECTRUM_MAX = 64  # singular values per module kept in the report
CHECKPOINT_K = 16  # default k when ΔW comes from two checkpoints (no adapter rank)
@dataclass
class Options:
    targets: str | None = None
    k: int | None = None  # None: the adapter's rank of each module (CHECKPOINT_K for checkpoints)
    intruder_k: int = 10
    intruder_eps: float = 0.5
    svd: str = "auto"  # auto | full | randomized (W₀'s SVD)
    seed: int = 0
    cache: bool = True

    def validate(self) -> None:
        if self.k is not None and self.k <= 0:
            raise UsageError(f"--k {self.k}: must be a positive integer")
        if self.intruder_k <= 0:
            raise UsageError(f"--intruder-k {self.intruder_k}: must be a positive integer")
        if not (0.0 < self.intruder_eps <= 1.0):
            raise UsageError(f"--intruder-eps {self.intruder_eps:g}: must be in (0, 1]")
        if self.svd not in ("auto", "full", "randomized"):
            raise UsageError(f"--svd {self.svd!r}: use auto, full or randomized")
        if self.cache:
            cache_max()  # a bad $ADAPTEDIT_SVD_CACHE_MAX is reported before any work
        checks.seed(self.seed)


# ----------------------------------------------------------------------------------------------
# one module


def analyze_module(w0: torch.Tensor, svd0: dict, *, p: torch.Tensor | None = None,
                   q: torch.Tensor | None = None, dense: torch.Tensor | None = None, k: int,
                   intruder_k: int = 10, eps: float = 0.5) -> dict:
    """Every metric of one module. ΔW is P @ Q (low-rank, never formed) or ``dense``; W₀ is
    (out × in) float32 and ``svd0`` its SVD from :func:`base_svd`. float64 throughout."""
    out_f, in_f = w0.shape
    m = min(out_f, in_f)
    w0d = w0.double()
    w0_norm = float(torch.linalg.matrix_norm(w0d))
    u_d, s_d, vh_d = geometry.delta_svd(p, q, dense=dense)
    fro = float(s_d.norm())
    rec = {"fro": fro, "rel": fro / w0_norm if w0_norm > 0 else None,
           "spectral": float(s_d[0]) if s_d.numel() else 0.0, "w0_fro": w0_norm}
    if fro == 0.0:
        return {**rec, **_empty()}
    if dense is not None:
        rec["delta_m"], rec["delta_d"] = geometry.magnitude_direction(w0d, w0d + dense.double())
    else:
        rec["delta_m"], rec["delta_d"] = geometry.magnitude_direction_lowrank(w0d, p, q)

    # where the update lives: W₀'s top-k and bottom-k singular subspaces, both sides
    u0, vh0 = svd0["u"].double(), svd0["vh"].double()
    kk = min(k, u0.shape[1])
    v_d = vh_d.T
    rec["e_top_out"] = geometry.subspace_energy(u0[:, :kk], u_d, s_d)
    rec["e_top_in"] = geometry.subspace_energy(vh0[:kk].T, v_d, s_d)
    if svd0["complete"]:
        ub, vhb = u0, vh0  # W₀'s last singular vectors: the full matrices or their stored end
        if svd0.get("u_bottom") is not None:
            ub, vhb = svd0["u_bottom"].double(), svd0["vh_bottom"].double()
        nb = ub.shape[1]
        rec["e_bottom_out"] = geometry.subspace_energy(ub[:, nb - k:], u_d, s_d)
        rec["e_bottom_in"] = geometry.subspace_energy(vhb[nb - k:].T, v_d, s_d)
    else:
        rec["e_bottom_out"] = rec["e_bottom_in"] = None
    rec["e_top"] = geometry.two_sided_energy(u0[:, :kk], vh0[:kk].T, u_d, s_d, v_d)
    rec["e_bottom"] = (geometry.two_sided_energy(ub[:, nb - k:], vhb[nb - k:].T, u_d, s_d, v_d)
                       if svd0["complete"] else None)
    # what an isotropic random update would put there (output side, input side, either)
    rec["e_random"] = 1 - (1 - k / out_f) * (1 - k / in_f)

    # ΔW's own leading subspace against W₀'s
    r_num = geometry.numerical_rank(s_d, w0.shape)
    kd = max(1, min(k, r_num))
    angles = geometry.principal_angles(u_d[:, :kd], u0[:, :kk])
    rec["angles_deg"] = [float(a) for a in angles]
    rec["angle_min"] = float(angles.min())
    rec["angle_mean"] = float(angles.mean())
    rec["phi"] = geometry.subspace_similarity(u_d[:, :kd], u0[:, :kk])
    rec["amplification"] = geometry.amplification(w0d, u_d[:, :kd], s_d[:kd], vh_d[:kd])
    rec["numerical_rank"] = r_num
    rec.update(geometry.rank_stats(s_d[:max(r_num, 1)]))

    # intruder dimensions: W₁'s top singular vectors against all of W₀'s
    ik = min(intruder_k, m)
    if dense is not None:
        start = torch.cat([u0[:, :ik + 8], u_d[:, :min(ik + 8, u_d.shape[1])]], dim=1)
        u1, s1 = geometry.top_left_singular(w0d + dense.double(), ik, start[:, :out_f])
    else:
        start = torch.cat([u0[:, :ik + 8], p.double()], dim=1)
        u1, s1 = geometry.top_left_singular(w0d, ik, start[:, :out_f], p=p, q=q)
    best = best_cos(svd0, u1, w0)  # against every left singular vector of W₀ (when exact)
    rec["intruders"] = int((best < eps).sum())
    rec["intruder_cos"] = [float(x) for x in best]
    rec["intruders_exact"] = bool(svd0["complete"])
    rec["spectrum_delta"] = [float(x) for x in s_d[:SPECTRUM_MAX]]
    return rec


def zero_record(w0: torch.Tensor) -> dict:
    """The record of a module whose ΔW is exactly zero."""
    return {"fro": 0.0, "rel": 0.0, "spectral": 0.0,
            "w0_fro": float(torch.linalg.matrix_norm(w0.double())), **_empty()}


def _empty() -> dict:
    """Metrics of an exactly zero update: nothing to locate, rank 0, no intruders."""
    return {"delta_m": 0.0, "delta_d": 0.0, "e_top_out": None, "e_top_in": None,
            "e_bottom_out": None, "e_bottom_in": None, "e_top": None, "e_bottom": None,
            "e_random": None, "angles_deg": [], "angle_min": None, "angle_mean": None,
            "phi": None, "amplification": None, "numerical_rank": 0, "effective_rank": 0.0,
            "stable_rank": 0.0, "energy_rank_90": 0, "energy_rank_99": 0, "intruders": 0,
            "intruder_cos": [], "intruders_exact": True, "spectrum_delta": []}


def zero_update(adapter, name: str) -> bool:
    """True when θ = θ₀ for every trainable tensor: ΔW = F(W, θ₀) − W = 0 exactly by construction
    (the method decides: for plain LoRA, B = 0 is enough)."""
    return adapter.is_identity(name)


def method_extras(adapter, name: str, w: torch.Tensor, fro: float) -> dict:
    """What inspect reports only for this method (DeLoRA's bound, DoRA's magnitude change, ...)."""
    return adapter.method.extras(adapter.tensors[name], adapter.config.modules[name], w, fro)


# ----------------------------------------------------------------------------------------------
# sources of ΔW


def _module_header(t: Target) -> dict:
    return {"name": t.name, "type": t.module_type, "layer": t.layer,
            "shape": [t.out_features, t.in_features]}


def _check_k(opts: Options, t: Target, default: int) -> int:
    k = opts.k if opts.k is not None else default
    m = min(t.out_features, t.in_features)
    if k > m:
        if opts.k is None:
            return m
        raise UsageError(f"--k {k} exceeds min(out, in) = {m} of {t.name} "
                         f"({t.out_features}×{t.in_features}); use --k ≤ {m}")
    return k


def _w0(ckpt, t: Target, ref: str) -> tuple[torch.Tensor, torch.Tensor]:
    raw = ckpt.get(t.key)
    w = to_w(raw, t.kind).float()
    if not torch.isfinite(w).all():
        raise AdapteditError(f"{ref}: weight {t.key} contains NaN or Inf; the checkpoint is damaged")
    return raw, w


def _adapter_targets(adapter, spec: str | None) -> list[Target]:
    return select([i.target(n) for n, i in adapter.config.modules.items()], spec)


def _adapter_delta(adapter, name: str, w: torch.Tensor) -> dict:
    """The keyword arguments of :func:`analyze_module` for one adapter module (or None: ΔW = 0)."""
    if zero_update(adapter, name):
        return None
    pq = adapter.factors(name)
    if pq is None:
        return {"dense": adapter.delta_w(name, w)}  # no known low-rank form (DoRA, rotations)
    return {"p": pq[0].double(), "q": pq[1].double()}


def _cheap_point(w: torch.Tensor, delta: dict | None) -> dict:
    """‖ΔW‖_F, ΔM, ΔD for one trajectory point."""
    if delta is None:
        return {"fro": 0.0, "delta_m": 0.0, "delta_d": 0.0}
    wd = w.double()
    if "dense" in delta:
        d = delta["dense"].double()
        dm, dd = geometry.magnitude_direction(wd, wd + d)
        return {"fro": float(d.norm()), "delta_m": dm, "delta_d": dd}
    p, q = delta["p"], delta["q"]
    dm, dd = geometry.magnitude_direction_lowrank(wd, p, q)
    fro = math.sqrt(max(float(((p.T @ p) * (q @ q.T)).sum()), 0.0))  # ‖PQ‖²_F = tr(PᵀP QQᵀ)
    return {"fro": fro, "delta_m": dm, "delta_d": dd}


def inspect_adapters(folders: list, *, base: str | None = None, opts: Options | None = None,
                     trajectory: bool = False, progress=None, trust_remote_code: bool = False
                     ) -> dict:
    """Analyse the first adapter in full; with ``trajectory`` (its training checkpoints) or several
    adapters, also ‖ΔW‖, ΔM and ΔD at every point. Returns the report dict."""
    from adaptedit.binding import base_for, check_weight, recorded_targets
    from adaptedit.checkpoints import checkpoint_dirs
    from adaptedit.formats import load_adapter
    from adaptedit.models import resolve

    opts = opts or Options()
    opts.validate()
    if trajectory and len(folders) > 1:
        raise UsageError("--trajectory follows the checkpoints of one adapter; give one ADAPTER_DIR "
                         "(several adapters without --trajectory compare their final (ΔD, ΔM))")
    start = time.perf_counter()
    main = load_adapter(folders[0])
    checks.adapter_tensors(main)
    points_src = []  # (label, step, Adapter)
    if trajectory:
        dirs = checkpoint_dirs(main.path)
        if not dirs:
            raise AdapteditError(f"{main.path}: no training checkpoints (checkpoints/step-NNNNNN/) "
                                 "to follow; train with checkpoints or drop --trajectory")
        for d in dirs:
            points_src.append((d.name, int(d.name[5:]), load_adapter(d)))
        last = points_src[-1][2]
        if any(not torch.equal(v, last.tensors[n][k]) for n, ts in main.tensors.items()
               if n in last.tensors for k, v in ts.items() if k in last.tensors[n]):
            points_src.append(("final", None, main))
    for f in folders[1:]:
        points_src.append((str(f), None, load_adapter(f)))
    if len(folders) > 1:
        points_src.insert(0, (str(folders[0]), None, main))
    for _, _, ad in points_src:  # adapters of other targets are compared on the modules they share
        checks.adapter_tensors(ad)
    source = (resolve(base, trust_remote_code=trust_remote_code) if base
              else base_for(main, None, trust_remote_code=trust_remote_code))
    targets = _adapter_targets(main, opts.targets)
    # the adapter's record against the checkpoint headers: no transformers model to build (seconds)
    found = recorded_targets(main, source)
    for _, _, ad in points_src:
        recorded_targets(ad, source)
    if main.config.source == "peft":  # PEFT's file order is by name: report in the model's order
        rank = {t.name: i for i, t in enumerate(source.targets)}
        targets.sort(key=lambda t: rank.get(t.name, len(rank)))
    ckpt = source.checkpoint
    task = progress.add_task("Inspecting", total=len(targets)) if progress else None

    def one(t: Target) -> tuple[dict, list, bool]:
        info = main.config.modules[t.name]
        bt = found[t.name]
        raw, w = _w0(ckpt, bt, source.ref)
        check_weight(main, t.name, raw, source.ref)
        k = _check_k(opts, t, info.rank)
        svd0 = base_svd(raw, bt.kind, w, mode=opts.svd, need=max(k, opts.intruder_k),
                        seed=opts.seed, cache=opts.cache)
        delta = _adapter_delta(main, t.name, w)
        if delta is None:
            rec = zero_record(w)
        else:
            rec = analyze_module(w, svd0, k=k, intruder_k=opts.intruder_k,
                                 eps=opts.intruder_eps, **delta)
        rec = {**_module_header(t), "k": k, "zero": delta is None, **rec,
               "spectrum_base": [float(x) for x in svd0["s"][:SPECTRUM_MAX]],
               "base_svd": svd0["kind"], "method": method_extras(main, t.name, w, rec["fro"])}
        if svd0["accuracy"]:
            rec["base_svd_accuracy"] = svd0["accuracy"]
        pts = []
        for label, step, ad in points_src:
            if t.name not in ad.config.modules:
                continue
            if ad is not main:
                check_weight(ad, t.name, raw, source.ref)
            pt = _cheap_point(w, _adapter_delta(ad, t.name, w))
            pts.append({"label": label, "step": step, "module": t.name,
                        "type": t.module_type, "layer": t.layer, **pt})
        if not points_src:
            pts.append({"label": str(main.path), "step": None, "module": t.name,
                        "type": t.module_type, "layer": t.layer, "fro": rec["fro"],
                        "delta_m": rec["delta_m"], "delta_d": rec["delta_d"]})
        if progress:
            progress.advance(task)
        return rec, pts, svd0["cached"]

    done = one_thread_each(one, targets)  # modules are independent: one thread each
    records = [rec for rec, _, _ in done]
    points = [p for _, pts, _ in done for p in pts]
    cache_hits = sum(cached for _, _, cached in done)
    notes = []
    cfg = main.config
    mode = "trajectory" if trajectory else ("adapters" if len(folders) > 1 else "adapter")
    report = _report(mode, records, points, opts, notes, start, cache_hits)
    report["base"] = {"ref": source.ref, "path": str(source.path)}
    report["adapter"] = {"path": str(main.path), "method": cfg.method, "dora": cfg.dora,
                         "rank": cfg.rank, "alpha": cfg.alpha, "source": cfg.source,
                         "training": cfg.training or None}
    report["points_sources"] = [{"label": lb, "step": st, "path": str(ad.path)}
                                for lb, st, ad in points_src]
    return report


def inspect_checkpoints(base: str | None, tuned: str, *, opts: Options | None = None, progress=None,
                        trust_remote_code: bool = False) -> dict:
    """ΔW = W_tuned − W_base for every selected linear module, one tensor pair at a time."""
    from adaptedit.models import compare_checkpoints, resolve

    opts = opts or Options()
    opts.validate()
    start = time.perf_counter()
    bsrc = resolve(base, trust_remote_code=trust_remote_code)
    tsrc = resolve(tuned, trust_remote_code=trust_remote_code)
    tkey = compare_checkpoints(bsrc, tsrc, "inspect")  # {base key: tuned key}
    bc, tc = bsrc.checkpoint, tsrc.checkpoint
    targets = select(bsrc.targets, opts.targets)
    task = progress.add_task("Inspecting", total=len(targets)) if progress else None

    def one(t: Target) -> tuple[dict, dict, bool]:
        raw, w = _w0(bc, t, bsrc.ref)
        _, w1 = _w0(tc, replace(t, key=tkey[t.key]), tsrc.ref)
        k = _check_k(opts, t, CHECKPOINT_K)
        svd0 = base_svd(raw, t.kind, w, mode=opts.svd, need=max(k, opts.intruder_k),
                        seed=opts.seed, cache=opts.cache)
        d = w1 - w
        del w1
        zero = not bool(torch.count_nonzero(d))
        rec = zero_record(w) if zero else analyze_module(
            w, svd0, dense=d, k=k, intruder_k=opts.intruder_k, eps=opts.intruder_eps)
        rec = {**_module_header(t), "k": k, "zero": zero, **rec,
               "spectrum_base": [float(x) for x in svd0["s"][:SPECTRUM_MAX]],
               "base_svd": svd0["kind"], "method": {}}
        if svd0["accuracy"]:
            rec["base_svd_accuracy"] = svd0["accuracy"]
        point = {"label": tsrc.ref, "step": None, "module": t.name, "type": t.module_type,
                 "layer": t.layer, "fro": rec["fro"], "delta_m": rec["delta_m"],
                 "delta_d": rec["delta_d"]}
        if progress:
            progress.advance(task)
        return rec, point, svd0["cached"]

    done = one_thread_each(one, targets)  # modules are independent: one thread each
    records = [rec for rec, _, _ in done]
    points = [point for _, point, _ in done]
    cache_hits = sum(cached for _, _, cached in done)
    report = _report("checkpoints", records, points, opts, [], start, cache_hits)
    report["base"] = {"ref": bsrc.ref, "path": str(bsrc.path)}
    report["tuned"] = {"ref": tsrc.ref, "path": str(tsrc.path)}
    return report


def _report(mode, records, points, opts, notes, start, cache_hits) -> dict:
    model = aggregate(records)
    overlap = [r["name"] for r in records if 2 * r["k"] > min(r["shape"])]
    if overlap:
        notes.append(f"{len(overlap)} module(s) (e.g. {overlap[0]}) have 2k > min(out, in): their "
                     "top-k and bottom-k subspaces overlap, so E_top and E_bottom say little there;"
                     " lower --k")
    approx = [r for r in records if r["base_svd"] != "full"]
    if approx:
        worst = max(approx, key=lambda r: (r.get("base_svd_accuracy") or {}).get("max_residual", 0))
        res = (worst.get("base_svd_accuracy") or {}).get("max_residual")
        notes.append(f"W₀'s SVD is randomized for {len(approx)} module(s): E_bottom is not available"
                     " there, intruder counts are upper bounds, and E_top and the angles use "
                     "approximate singular vectors"
                     + (f" (worst relative residual {res:.2g}, {worst['name']})" if res else "")
                     + "; --svd full gives exact ones")
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "adaptedit_version": __version__,
        "mode": mode, "base": None, "adapter": None, "tuned": None,
        "options": {**asdict(opts), "k_default": "adapter rank" if mode != "checkpoints"
                    else CHECKPOINT_K},
        "verdict": verdict(model, mode),
        "model": model,
        "by_type": group(records, "type"),
        "by_layer": group([r for r in records if r["layer"] is not None], "layer"),
        "modules": records,
        "md": {"points": points, "correlation": md_correlation(points)},
        "svd_cache": {"hits": cache_hits, "computed": len(records) - cache_hits},
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 3),
    }
