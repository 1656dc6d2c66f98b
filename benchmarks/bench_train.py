"""Training-step speed and memory: adaptedit vs PEFT + a plain PyTorch loop, same model and data.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--warmup 1] [--rank 16]

Embedded SmolLM2-135M-Instruct, CPU, fp32, all linear modules, batch 8 × 128 tokens of chat data
(arithmetic Q/A conversations, prompt masked as `adaptedit train` does). Each configuration runs in
its own process (peak RSS is per process); the step is forward + backward + clip + AdamW.
Prints a table and a JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time

CONFIGS = [("adaptedit", "lora"), ("peft", "lora"), ("adaptedit", "pissa"), ("peft", "pissa"),
           ("adaptedit", "dora"), ("peft", "dora")]


def timed_steps(model, params, step_loss, steps: int, warmup: int):
    """Median seconds of ``steps`` training steps (forward + backward + clip + AdamW) after
    ``warmup``, and the last loss."""
    import torch

    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = step_loss()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], loss


def batch(tok, n=8, length=128, seed=0):
    """n chat examples of exactly ``length`` tokens (truncated / right-padded), prompt masked."""
    from adaptedit.data import Tokenize, collate
    import torch

    rng = random.Random(seed)
    t = Tokenize(tok)
    examples = []
    for _ in range(n):
        msgs = []
        for _ in range(4):
            a, b, c = rng.randint(1, 70), rng.randint(1, 70), rng.randint(1, 30)
            msgs += [{"role": "user", "content": f"Tom has {a} apples, buys {b} more and gives "
                                                 f"{c} away. How many are left?"},
                     {"role": "assistant", "content": f"{a} + {b} - {c} = {a + b - c}."}]
        ids, trained = t("messages", {"messages": msgs})
        ids, trained = ids[:length], trained[:length]
        examples.append((torch.tensor(ids, dtype=torch.int32), torch.tensor(trained)))
    b = collate(examples, pad_id=0)
    if b["input_ids"].shape[1] < length:  # pad to the full length
        import torch.nn.functional as F

        pad = length - b["input_ids"].shape[1]
        b = {"input_ids": F.pad(b["input_ids"], (0, pad)),
             "attention_mask": F.pad(b["attention_mask"], (0, pad)),
             "labels": F.pad(b["labels"], (0, pad), value=-100)}
    return b


def one(impl: str, method: str, steps: int, warmup: int, rank: int) -> dict:
    import torch

    from adaptedit.models import resolve

    torch.manual_seed(0)
    source = resolve(None)
    tok = source.tokenizer()
    data = batch(tok)
    model = source.load(dtype=torch.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        init = {"lora": True, "dora": True, "pissa": "pissa_niter_4"}[method]
        alpha = rank if method == "pissa" else 2 * rank
        cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0,
                         init_lora_weights=init, use_dora=method == "dora")
        model = get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]

        def step_loss():
            return model(**data).loss
    else:
        from adaptedit.init import InitOptions, build
        from adaptedit.layer import attach, trainable_parameters
        from adaptedit.loss import TrainedPositions, loss_sum

        m = "lora" if method == "dora" else method
        adapter = build(source, InitOptions(method=m, rank=rank, dora=method == "dora",
                                            svd="randomized" if m == "pissa" else "auto"))
        attach(model, adapter)
        params = trainable_parameters(model)
        positions = TrainedPositions(model)
        n = (data["labels"][:, 1:] != -100).sum()

        def step_loss():
            return loss_sum(model, positions, data, torch.device("cpu")) / n
    step_s, loss = timed_steps(model, params, step_loss, steps, warmup)
    tokens = data["input_ids"].numel()
    return {"impl": impl, "method": method, "rank": rank, "step_s": round(step_s, 3),
            "tok_s": round(tokens / step_s, 1), "loss": round(float(loss.detach()), 4),
            "trainable": sum(p.numel() for p in params),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_load_mb": round(rss0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--one", nargs=2, metavar=("IMPL", "METHOD"))
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(*a.one, a.steps, a.warmup, a.rank)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M fp32 CPU, "
          f"rank {a.rank}, all-linear, batch 8 x 128 tokens, median of {a.steps} steps after "
          f"{a.warmup} warmup", flush=True)
    results = {}
    for impl, method in CONFIGS:
        p = subprocess.run([sys.executable, __file__, "--one", impl, method, "--steps",
                            str(a.steps), "--warmup", str(a.warmup), "--rank", str(a.rank)],
                           capture_output=True, text=True)
        if p.returncode:
            print(f"{impl} {method}: failed\n{p.stderr[-2000:]}", flush=True)
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results[(impl, method)] = r
        print(json.dumps(r), flush=True)
    print("\n| method | adaptedit tok/s | PEFT tok/s | speed-up | adaptedit peak RSS MB | "
          "PEFT peak RSS MB |\n|---|---|---|---|---|---|")
    for method in ("lora", "pissa", "dora"):
        ours, peft = results.get(("adaptedit", method)), results.get(("peft", method))
        if ours and peft:
            print(f"| {method} | {ours['tok_s']:.0f} | {peft['tok_s']:.0f} | "
                  f"{ours['tok_s'] / peft['tok_s']:.2f}x | {ours['peak_rss_mb']} | "
                  f"{peft['peak_rss_mb']} |")
    for impl in ("adaptedit", "peft"):
        d, lo = results.get((impl, "dora")), results.get((impl, "lora"))
        if d and lo:
            print(f"{impl}: DoRA step time / LoRA step time = {d['step_s'] / lo['step_s']:.2f}")


if __name__ == "__main__":
    main()
