"""init speed and accuracy: adaptedit vs PEFT on the embedded SmolLM2-135M.

    .venv/bin/python benchmarks/bench_init.py [--rank 16] [--niter 4] [--runs 3]      # processes
    .venv/bin/python benchmarks/bench_init.py --library [--repeat 3]                   # in-process

Default: whole processes, as users run them, alternating (adaptedit cold, adaptedit warm, adaptedit
--energy-floor 0 cold, PEFT) ``--runs`` times; the median wall time of each and the ratio PEFT /
adaptedit (target ≥ 2×). "Cold" deletes the Gram spectra init caches per base weight
(``svd_cache.gram_spectra``) before the run; "warm" runs right after a cold run, as a second init of
the same base (another rank, seed or method) does:

- adaptedit: ``python -m adaptedit init smollm2-135m --method pissa --svd randomized --niter 4
  --rank 16 -o DIR --force -q`` (with the default energy floor: every module's captured energy
  measured and the modules below 0.96 redone), and the same with ``--energy-floor 0`` (the guard
  off: the fixed sketch, nothing measured — the work PEFT does);
- PEFT: a script that loads the same safetensors folder with transformers
  (``AutoModelForCausalLM``, float32), calls ``get_peft_model(LoraConfig(init_lora_weights=
  "pissa_niter_4", target_modules="all-linear"))`` and ``save_pretrained``.

``--library`` times the decomposition alone (``init.build`` vs ``get_peft_model`` on a model in
memory) and reports the captured spectral energy of both, Σσ̂²/Σσ² against an exact SVD, mean and
worst over all 210 modules.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEFT_SCRIPT = """
import sys, torch, peft
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
cfg = peft.LoraConfig(r=int(sys.argv[3]), lora_alpha=int(sys.argv[3]), target_modules="all-linear",
                      init_lora_weights="pissa_niter_" + sys.argv[4])
peft.get_peft_model(model, cfg).save_pretrained(sys.argv[2])
"""


def processes(args) -> None:
    from adaptedit.models import cache_dir, resolve

    folder = resolve(None).path  # the converted embedded model (converted once, before timing)
    work = Path(tempfile.mkdtemp(prefix="bench-init-"))
    ours = [sys.executable, "-m", "adaptedit", "init", "smollm2-135m", "--method", "pissa", "--svd",
            "randomized", "--niter", str(args.niter), "--rank", str(args.rank), "--force", "-q"]
    runs = {
        "adaptedit init (energy floor 0.96), cold: no cached spectra": ours + ["-o", str(work / "a")],
        "adaptedit init (energy floor 0.96), warm: spectra cached by the run before":
            ours + ["-o", str(work / "w")],
        "adaptedit init --energy-floor 0 (guard off, as PEFT)": ours + ["--energy-floor", "0", "-o",
                                                         str(work / "b")],
        f"PEFT pissa_niter_{args.niter} (transformers load + get_peft_model + save)":
            [sys.executable, "-c", PEFT_SCRIPT, str(folder), str(work / "p"), str(args.rank),
             str(args.niter)],
    }
    times = {k: [] for k in runs}
    for _ in range(args.runs):
        for label, cmd in runs.items():
            if "cold" in label:  # the Gram spectra init caches per weight (svd_cache.gram_spectra)
                for entry in (cache_dir() / "svd").glob("*-gram.safetensors"):
                    entry.unlink()
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
            times[label].append(time.perf_counter() - t)
    peft_label = list(runs)[-1]
    peft_median = statistics.median(times[peft_label])
    print(f"\nSmolLM2-135M, rank {args.rank}, niter {args.niter}; whole processes, median of "
          f"{args.runs} alternating runs; {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset)')}\n")
    print("| process | runs (s) | median s | PEFT / this | target ≥ 2× |\n|---|---|---|---|---|")
    for label, ts in times.items():
        med = statistics.median(ts)
        ratio = peft_median / med
        verdict = "—" if label == peft_label else ("met" if ratio >= 2 else "MISSED")
        print(f"| {label} | {', '.join(f'{t:.1f}' for t in ts)} | {med:.1f} | {ratio:.2f}× | {verdict} |")


def captured(products: dict, exact: dict) -> tuple[float, float]:
    ratios = [float(products[n].norm() ** 2 / exact[n]) for n in exact]
    return sum(ratios) / len(ratios), min(ratios)


def library(args) -> None:
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

    def ours(svd: str, floor: float):
        best, adapter = float("inf"), None
        for _ in range(args.repeat):
            t = time.perf_counter()
            adapter = build(source, InitOptions(method="pissa", rank=r, alpha=r, svd=svd,
                                                niter=args.niter, seed=0, device="cpu",
                                                energy_floor=floor))
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
    for label, our_svd, floor, peft_init in [
            (f"randomized, niter {args.niter}, floor 0.96", "randomized", 0.96,
             f"pissa_niter_{args.niter}"),
            (f"randomized, niter {args.niter}, floor 0", "randomized", 0.0,
             f"pissa_niter_{args.niter}"),
            ("full SVD", "full", 0.0, "pissa")]:
        t_ours, p_ours = ours(our_svd, floor)
        t_peft, p_peft = theirs(peft_init)
        rows.append((label, t_ours, t_peft, captured(p_ours, exact), captured(p_peft, exact)))

    print(f"\nSmolLM2-135M, {len(weights)} modules, rank {r}, torch threads {torch.get_num_threads()},"
          f" best of {args.repeat}")
    print("| SVD | adaptedit s | PEFT s | speed-up | energy adaptedit (mean / worst) | energy PEFT (mean / worst) |")
    print("|---|---|---|---|---|---|")
    for label, t_o, t_p, e_o, e_p in rows:
        print(f"| {label} | {t_o:.2f} | {t_p:.2f} | {t_p / t_o:.2f}× | {e_o[0]:.4f} / {e_o[1]:.4f} |"
              f" {e_p[0]:.4f} / {e_p[1]:.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--niter", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3, help="alternating whole-process runs")
    ap.add_argument("--library", action="store_true", help="in-process timings and energies")
    ap.add_argument("--repeat", type=int, default=3, help="--library: best of N")
    args = ap.parse_args()
    library(args) if args.library else processes(args)


if __name__ == "__main__":
    main()
