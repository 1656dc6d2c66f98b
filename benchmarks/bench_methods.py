"""Training-step speed and memory of the non-LoRA methods: adaptedit vs PEFT, same model and data.

    .venv/bin/python benchmarks/bench_methods.py [--steps 2] [--warmup 1] [--runs 1]
                                                 [--methods oft,boft,hra,ia3,vera,road]

Embedded SmolLM2-135M-Instruct, CPU, fp32, batch 8 × 128 tokens of chat data (bench_train.py's
batch, prompt masked), forward + backward + clip + AdamW. Each (implementation, method) runs in its
own process (peak RSS is per process), adaptedit and PEFT alternating, ``--runs`` times; the
median step time of each and the ratio adaptedit tok/s / PEFT tok/s. Both sides compute the same
function with the same sizes:

    oft   block size 32, exact Cayley (PEFT: use_cayley_neumann=False; its Neumann default is
          timed too, as "oft-neumann", PEFT only)
    boft  block size 4, one butterfly factor (PEFT on CPU forces one: its m > 1 needs its CUDA
          extension); adaptedit's default m = 2 is timed too ("boft-m2", adaptedit only)
    hra   r = 8;  ia3  k_proj, v_proj, down_proj (input side);  vera  r = 256;  road  road_1, g = 64
    all-linear targets except ia3.

Prints a JSON line per process and a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

METHODS = ["oft", "boft", "hra", "ia3", "vera", "road"]
ONLY = {"oft-neumann": "peft", "boft-m2": "adaptedit"}  # extra rows, one implementation each


def _adaptedit_opts(method: str):
    from adaptedit.init import InitOptions

    return {"oft": InitOptions(method="oft", options={"block_size": 32}),
            "boft": InitOptions(method="boft", options={"block_size": 4, "butterfly_factors": 1}),
            "boft-m2": InitOptions(method="boft", options={"block_size": 4,
                                                           "butterfly_factors": 2}),
            "hra": InitOptions(method="hra", rank=8),
            "ia3": InitOptions(method="ia3"),
            "vera": InitOptions(method="vera", rank=256),
            "road": InitOptions(method="road")}[method]


def _peft_config(method: str):
    import peft

    lin = "all-linear"
    return {"oft": lambda: peft.OFTConfig(oft_block_size=32, use_cayley_neumann=False,
                                          target_modules=lin),
            "oft-neumann": lambda: peft.OFTConfig(oft_block_size=32, target_modules=lin),
            "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1,
                                            target_modules=lin),
            "hra": lambda: peft.HRAConfig(r=8, target_modules=lin),
            "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                          feedforward_modules=["down_proj"]),
            "vera": lambda: peft.VeraConfig(r=256, target_modules=lin, save_projection=True),
            "road": lambda: peft.RoadConfig(variant="road_1", group_size=64,
                                            target_modules=lin)}[method]()


def one(impl: str, method: str, steps: int, warmup: int) -> dict:
    import warnings

    import torch
    from bench_train import batch, timed_steps

    from adaptedit.models import resolve

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    source = resolve(None)
    data = batch(source.tokenizer())
    model = source.load(dtype=torch.float32)
    if impl == "peft":
        from peft import get_peft_model

        model = get_peft_model(model, _peft_config(method))
        params = [p for p in model.parameters() if p.requires_grad]

        def step_loss():
            return model(**data).loss
    else:
        from adaptedit.init import build
        from adaptedit.layer import attach, trainable_parameters
        from adaptedit.loss import TrainedPositions, loss_sum

        attach(model, build(source, _adaptedit_opts(method)))
        params = trainable_parameters(model)
        positions = TrainedPositions(model)
        n = (data["labels"][:, 1:] != -100).sum()

        def step_loss():
            return loss_sum(model, positions, data, torch.device("cpu")) / n
    step_s, loss = timed_steps(model, params, step_loss, steps, warmup)
    return {"impl": impl, "method": method, "step_s": round(step_s, 3),
            "tok_s": round(data["input_ids"].numel() / step_s, 1),
            "loss": round(float(loss.detach()), 4), "trainable": sum(p.numel() for p in params),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS + list(ONLY)))
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "METHOD"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one, a.steps, a.warmup)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M fp32 CPU, "
          f"batch 8 x 128 tokens, median of {a.steps} steps after {a.warmup} warm-up, "
          f"{a.runs} run(s) alternating", flush=True)
    methods = a.methods.split(",")
    results: dict = {}
    for _ in range(a.runs):
        for method in methods:
            for impl in ("adaptedit", "peft"):
                if ONLY.get(method, impl) != impl:
                    continue
                p = subprocess.run([sys.executable, __file__, "--one", impl, method, "--steps",
                                    str(a.steps), "--warmup", str(a.warmup)],
                                   capture_output=True, text=True)
                if p.returncode:
                    print(f"{impl} {method}: failed\n{p.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results.setdefault((impl, method), []).append(r)
                print(json.dumps(r), flush=True)
    print("\n| method | adaptedit tok/s | PEFT tok/s | ratio | adaptedit peak RSS MB | "
          "PEFT peak RSS MB | trainable (adaptedit / PEFT) |\n|---|---|---|---|---|---|---|")
    for method in methods:
        ours, peft = results.get(("adaptedit", method)), results.get(("peft", method))
        cell = {}
        for key, rs in (("a", ours), ("p", peft)):
            if rs:
                cell[key] = (_median([r["tok_s"] for r in rs]),
                             _median([r["peak_rss_mb"] for r in rs]), rs[0]["trainable"])
        a_, p_ = cell.get("a"), cell.get("p")
        ratio = f"{a_[0] / p_[0]:.2f}x" if a_ and p_ else "—"
        print(f"| {method} | {a_[0]:.0f} | " if a_ else f"| {method} | — | ", end="")
        print(f"{p_[0]:.0f} | " if p_ else "— | ", end="")
        print(f"{ratio} | {a_[1] if a_ else '—'} | {p_[1] if p_ else '—'} | "
              f"{a_[2] if a_ else '—'} / {p_[2] if p_ else '—'} |")


if __name__ == "__main__":
    main()
