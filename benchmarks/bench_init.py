"""init speed and accuracy: adaptedit vs PEFT on the embedded SmolLM2-135M, in one run.

    .venv/bin/python benchmarks/bench_init.py [--rank 16] [--niter 4] [--repeat 3]

Times the decomposition of all 210 linear modules (adaptedit: `init.build`, which also reads every
weight from disk and fingerprints it; PEFT: `get_peft_model` on a model already in memory, so PEFT
is not charged for loading) and reports the captured spectral energy of the rank-r factors of both,
Σσ̂²/Σσ² against an exact SVD, averaged and worst over all modules.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def captured(products: dict, exact: dict) -> tuple[float, float]:
    ratios = [float(products[n].norm() ** 2 / exact[n]) for n in exact]
    return sum(ratios) / len(ratios), min(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    r = args.rank

    import peft

    from adaptedit.init import InitOptions, build
    from adaptedit.models import resolve

    torch.manual_seed(0)
    source = resolve(None)
    base = source.load(dtype=torch.float32)
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    exact = {n: float((torch.linalg.svdvals(w)[:r].double() ** 2).sum()) for n, w in weights.items()}

    def ours(svd: str):
        best, adapter = float("inf"), None
        for _ in range(args.repeat):
            t = time.perf_counter()
            adapter = build(source, InitOptions(method="pissa", rank=r, alpha=r, svd=svd,
                                                niter=args.niter, seed=0, device="cpu"))
            best = min(best, time.perf_counter() - t)
        prods = {}
        for n, info in adapter.config.modules.items():
            t = adapter.tensors[n]
            prods[n] = info.scaling * t["lora_B0"] @ t["lora_A0"]
        return best, prods

    def theirs(init: str):
        best, pm = float("inf"), None
        for _ in range(args.repeat):
            model = copy.deepcopy(base)
            cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights=init)
            t = time.perf_counter()
            pm = peft.get_peft_model(model, cfg)
            best = min(best, time.perf_counter() - t)
        prods = {n: weights[n] - pm.base_model.model.get_submodule(n).base_layer.weight.detach()
                 for n in weights}
        return best, prods

    rows = []
    for label, our_svd, peft_init in [(f"randomized, niter {args.niter}", "randomized",
                                       f"pissa_niter_{args.niter}"), ("full SVD", "full", "pissa")]:
        t_ours, p_ours = ours(our_svd)
        t_peft, p_peft = theirs(peft_init)
        e_ours, e_peft = captured(p_ours, exact), captured(p_peft, exact)
        rows.append((label, t_ours, t_peft, e_ours, e_peft))

    print(f"\nSmolLM2-135M, {len(weights)} modules, rank {r}, torch threads {torch.get_num_threads()},"
          f" best of {args.repeat}")
    print("| SVD | adaptedit s | PEFT s | speed-up | energy adaptedit (mean / worst) | energy PEFT (mean / worst) |")
    print("|---|---|---|---|---|---|")
    for label, t_o, t_p, e_o, e_p in rows:
        print(f"| {label} | {t_o:.2f} | {t_p:.2f} | {t_p / t_o:.2f}× | {e_o[0]:.4f} / {e_o[1]:.4f} |"
              f" {e_p[0]:.4f} / {e_p[1]:.4f} |")


if __name__ == "__main__":
    main()
