"""inspect on a Llama-7B-shaped adapter, CPU: time and SVD-cache size per module, extrapolated.

    .venv/bin/python benchmarks/bench_inspect_7b.py [--layers 2] [--rank 16] [--keep DIR]

A synthetic checkpoint with Llama-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, bf16;
Gaussian weights, a small vocabulary) but only ``--layers`` decoder layers, written tensor by tensor;
a rank-16 LoRA adapter on all 7 linear modules of each layer (B perturbed as after training). The
library call `inspect.inspect_adapters` runs once with an empty SVD cache (cold) and once warm;
the per-module figures are extrapolated to the 32 layers (224 modules) of the real model.

Target (docs/benchmarks.md): a 7B-shaped adapter inspected cold in ≤ 15 min on 2 CPU cores, with
an SVD cache ≤ 1 GB (full U, S, Vᵀ in float32 would be about 40 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, LAYERS_7B = 4096, 11008, 32, 32
TARGET_S, TARGET_BYTES = 15 * 60, 1e9


def make_checkpoint(folder: Path, layers: int, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
              "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTER)}
    state = {"model.embed_tokens.weight": torch.randn(512, HIDDEN, generator=g).bfloat16(),
             "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
             "lm_head.weight": torch.randn(512, HIDDEN, generator=g).bfloat16()}
    for i in range(layers):
        for name, (o, n) in shapes.items():
            state[f"model.layers.{i}.{name}.weight"] = (torch.randn(o, n, generator=g)
                                                        / n ** 0.5).bfloat16()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": HEADS, "vocab_size": 512, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-inspect-7b-"))
    os.environ["ADAPTEDIT_CACHE"] = str(work / "cache")  # cold: an empty cache of its own

    from adaptedit import analysis
    from adaptedit.init import InitOptions, build
    from adaptedit.models import resolve

    t = time.perf_counter()
    base = make_checkpoint(work / "base", args.layers)
    print(f"checkpoint ({args.layers} layers): {time.perf_counter() - t:.1f} s", file=sys.stderr)
    ad = build(resolve(str(base)), InitOptions(method="lora", rank=args.rank))
    g = torch.Generator().manual_seed(1)
    for ts in ad.tensors.values():
        ts["lora_B"] = 1e-3 * torch.randn(ts["lora_B"].shape, generator=g)
    ad.save(work / "adapter")

    per_module = {}
    times = {}
    for run in ("cold", "warm"):
        t = time.perf_counter()
        rep = analysis.inspect_adapters([work / "adapter"])
        times[run] = time.perf_counter() - t
    svd_dir = work / "cache" / "svd"
    sizes = {p.name: p.stat().st_size for p in svd_dir.glob("*.safetensors")}
    for r in rep["modules"]:
        per_module.setdefault(r["type"], []).append(r["base_svd"])
    n = len(rep["modules"])
    total_bytes = sum(sizes.values())
    scale = LAYERS_7B / args.layers
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; {n} modules "
          f"({args.layers} layers of Llama-7B shapes), W₀ SVD: {sorted(set(sum(per_module.values(), [])))}\n")
    print("| | measured | per module | extrapolated to 32 layers (224 modules) | target |")
    print("|---|---|---|---|---|")
    cold7 = times["cold"] * scale
    print(f"| inspect, cold SVD cache | {times['cold']:.1f} s | {times['cold'] / n:.2f} s | "
          f"{cold7 / 60:.1f} min | ≤ {TARGET_S // 60} min: {'met' if cold7 <= TARGET_S else 'MISSED'} |")
    print(f"| inspect, warm | {times['warm']:.1f} s | {times['warm'] / n:.2f} s | "
          f"{times['warm'] * scale / 60:.1f} min | — |")
    b7 = total_bytes * scale
    print(f"| SVD cache | {total_bytes / 1e6:.1f} MB | {total_bytes / n / 1e6:.2f} MB | "
          f"{b7 / 1e9:.2f} GB | ≤ {TARGET_BYTES / 1e9:.1f} GB: {'met' if b7 <= TARGET_BYTES else 'MISSED'} |")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
