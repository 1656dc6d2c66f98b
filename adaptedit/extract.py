"""Extract a LoRA adapter from a fine-tune: the truncated SVD of ΔW = W_tuned − W_base.

    ΔW = U S Vᵀ ≈ U_r S_r V_rᵀ = B A,   B = U_r √S_r (out × r),  A = √S_r V_rᵀ (r × in),  α = r (s = 1)

The rank is fixed (``rank``) or the smallest one whose singular values hold an ``energy`` fraction of
‖ΔW‖²_F (Eckart–Young: the truncated SVD is the best rank-r approximation in Frobenius norm, so the
relative error is √(1 − energy captured)). Small matrices, and every matrix under ``energy``, use an
exact SVD; larger ones at a fixed rank use the seeded randomized SVD. The weights are read one pair of
tensors at a time. The result is a native adapter of the BASE (fingerprints of the base weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adaptedit import checks
from adaptedit.adapter import Adapter, AdapterConfig, ModuleInfo
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.linalg import fingerprint, randomized_svd
from adaptedit.models import ModelSource, compare_checkpoints
from adaptedit.targets import select, to_w

EXACT_MAX = 1024  # min(out, in) up to which the exact SVD is used at a fixed rank


@dataclass
class ModuleReport:
    name: str
    shape: tuple
    rank: int
    delta_norm: float
    rel_error: float
    energy: float


def _factors(d: torch.Tensor, rank: int | None, energy: float | None, gen) -> tuple:
    """(B, A, singular values kept², total energy) of the truncated SVD of d (float32 out × in)."""
    total = float(d.double().pow(2).sum())
    m = min(d.shape)
    if total == 0.0:
        r = 1 if rank is None else min(rank, m)
        return torch.zeros(d.shape[0], r), torch.zeros(r, d.shape[1]), 0.0, 0.0
    if energy is None and m > EXACT_MAX and rank < m // 2:
        u, s, vh = randomized_svd(d, rank, generator=gen)
        u, s, vh = u.double(), s.double(), vh.double()
    else:
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        if energy is not None:
            cum = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
            r = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
            rank = min(max(r, 1), m)
        rank = min(rank, m)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    root = s.sqrt()
    b = (u * root).float().contiguous()
    a = (root.unsqueeze(1) * vh).float().contiguous()
    return b, a, float(s.pow(2).sum()), total


def extract(base: ModelSource, tuned: ModelSource, *, rank: int | None = None,
            energy: float | None = None, targets: str = "all-linear", seed: int = 0,
            progress=None) -> tuple[Adapter, list[ModuleReport], list[str]]:
    """The adapter of ``base`` whose update approximates ``tuned``; per-module reports; the names of
    untargeted tensors that the fine-tune changed (they are not captured)."""
    if (rank is None) == (energy is None):
        raise UsageError("give exactly one of --rank R or --energy E")
    if rank is not None and rank <= 0:
        raise UsageError(f"--rank {rank}: must be a positive integer")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise UsageError(f"--energy {energy:g}: must be in (0, 1]")
    tkey = compare_checkpoints(base, tuned, "extract")  # {base key: tuned key}
    bc, tc = base.checkpoint, tuned.checkpoint
    chosen = select(base.targets, targets)
    checks.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    tensors, infos, reports = {}, {}, []
    task = progress.add_task("Extracting", total=len(chosen)) if progress else None
    for t in chosen:
        wb_raw = bc.get(t.key)
        wb = to_w(wb_raw, t.kind).float()
        wt = to_w(tc.get(tkey[t.key]), t.kind).float()
        d = wt - wb
        del wt
        if not torch.isfinite(d).all():
            raise AdapteditError(f"tensor {t.key}: the difference has NaN or Inf")
        b, a, kept, total = _factors(d, rank, energy, gen)
        r = a.shape[0]
        err = float(torch.linalg.norm(d - b @ a) / torch.linalg.norm(d)) if total > 0 else 0.0
        tensors[t.name] = {"lora_A": a, "lora_B": b}
        infos[t.name] = ModuleInfo.of(t, rank=r, alpha=float(r), scaling=1.0,
                                      fingerprint=fingerprint(wb_raw))
        reports.append(ModuleReport(t.name, (t.out_features, t.in_features), r, math.sqrt(total),
                                    err, kept / total if total > 0 else 1.0))
        if progress:
            progress.advance(task)
    target_keys = {t.key for t in chosen}
    changed = [k for k in bc.keys()
               if k not in target_keys and not torch.equal(bc.get(k), tc.get(tkey[k]))]
    top = max(i.rank for i in infos.values())  # ≤ --rank: a module's rank is capped by its shape
    config = AdapterConfig(
        method="lora", rank=top, alpha=float(top),
        base={"ref": base.ref, "path": str(base.path), "kind": base.kind},
        modules=infos, targets=targets,
        rank_pattern={n: i.rank for n, i in infos.items() if i.rank != top},
        init={"extract": {"tuned": tuned.ref, "rank": rank, "energy": energy, "seed": seed,
                          "svd": f"exact up to min(out, in) = {EXACT_MAX}, else randomized"}},
    )
    return Adapter(config, tensors), reports, changed
