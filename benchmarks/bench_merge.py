"""merge memory and speed: adaptedit's streaming merge vs PEFT merge_and_unload + save_pretrained.

    .venv/bin/python benchmarks/bench_merge.py [--layers 8,18] [--workdir /tmp] [--no-doc]

For each size, writes a synthetic Llama-shaped fp16 checkpoint (hidden 2048, intermediate 5632,
vocab 32000; 8 layers ≈ 1.1 GB, 18 layers ≈ 2.1 GB), a rank-16 adaptedit LoRA adapter on all linear
layers with random nonzero B (and the same adapter exported to PEFT), then runs, each in its own
subprocess under /usr/bin/time -v (peak RSS, wall):

    adaptedit   adaptedit merge ADAPTER --no-verify -o OUT            (default 5GB shards, streamed)
    peft        AutoModelForCausalLM.from_pretrained(fp16) → PeftModel.from_pretrained →
                merge_and_unload() → save_pretrained(OUT)
    copy        read every base file and write it again in 16 MiB blocks (the I/O floor)

and checks that the two merged models hold the same tensors (bit for bit). The files are in the
page cache for every run (warm cache for all three). Results go to docs/benchmarks.md, "## merge".
Everything generated is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HIDDEN, INTER, VOCAB, HEADS = 2048, 5632, 32000, 16

PEFT_SCRIPT = """
import sys, warnings, torch
warnings.filterwarnings("ignore")
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.disable_progress_bar(); logging.set_verbosity_error()
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""

COPY_SCRIPT = """
import sys, os
src, dst = sys.argv[1:3]
os.makedirs(dst, exist_ok=True)
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
        while True:
            block = f.read(16 << 20)
            if not block:
                break
            g.write(block)
"""


def make_base(folder: Path, layers: int) -> int:
    """Write a random fp16 Llama checkpoint shard by shard; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, tie_word_embeddings=False, dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    groups = [{"model.embed_tokens.weight": rnd(VOCAB, HIDDEN)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        groups.append({
            p + "self_attn.q_proj.weight": rnd(HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": rnd(HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": rnd(HIDDEN, HIDDEN),
            p + "self_attn.o_proj.weight": rnd(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": rnd(INTER, HIDDEN),
            p + "mlp.up_proj.weight": rnd(INTER, HIDDEN),
            p + "mlp.down_proj.weight": rnd(HIDDEN, INTER),
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.float16),
        })
    groups.append({"model.norm.weight": torch.ones(HIDDEN, dtype=torch.float16),
                   "lm_head.weight": rnd(VOCAB, HIDDEN)})
    weight_map, total = {}, 0
    shards = [groups[i:i + 4] for i in range(0, len(groups), 4)]
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: v for grp in shard for k, v in grp.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def make_adapters(base: Path, native: Path, peft_dir: Path) -> None:
    import torch

    from adaptedit.init import InitOptions, build
    from adaptedit.models import resolve
    from adaptedit.peft_io import export_peft

    ad = build(resolve(str(base)), InitOptions(method="lora", rank=16, seed=0))
    g = torch.Generator().manual_seed(1)
    for t in ad.tensors.values():
        t["lora_B"] = 0.01 * torch.randn(t["lora_B"].shape, generator=g)
    ad.save(native)
    export_peft(ad, peft_dir, force=True, base_ref=str(base))


def measure(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds and peak RSS of the child."""
    start = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return {"wall": wall, "rss": rss_kb * 1024}


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder):
        out = {}
        for f in folder.glob("*.safetensors"):
            h = safe_open(str(f), framework="pt")
            for k in h.keys():
                out[k] = h
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    return all(torch.equal(ia[k].get_tensor(k), ib[k].get_tensor(k)) for k in ia)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="8,18", help="layer counts of the synthetic models")
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    args = ap.parse_args()
    adaptedit_bin = str(Path(PY).parent / "adaptedit")
    rows = []
    for layers in [int(x) for x in args.layers.split(",")]:
        work = Path(tempfile.mkdtemp(prefix="bench_merge-", dir=args.workdir))
        try:
            base = work / "base"
            size = make_base(base, layers)
            make_adapters(base, work / "adapter", work / "peft_adapter")
            res = {"layers": layers, "size": size}
            res["adaptedit"] = measure([adaptedit_bin, "merge", str(work / "adapter"), "--no-verify",
                                        "-q", "-o", str(work / "out_adaptedit")])
            res["peft"] = measure([PY, "-c", PEFT_SCRIPT, str(base), str(work / "peft_adapter"),
                                   str(work / "out_peft")])
            res["copy"] = measure([PY, "-c", COPY_SCRIPT, str(base), str(work / "out_copy")])
            res["identical"] = same_tensors(work / "out_adaptedit", work / "out_peft")
            rows.append(res)
            print(json.dumps(res), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    report = render(rows, " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    print(report)
    if not args.no_doc:
        write_doc(report)


def render(rows: list[dict], command: str) -> str:
    lines = [
        "## merge",
        "",
        f"Command: `.venv/bin/python benchmarks/{command}`. Synthetic Llama-shaped fp16 checkpoints "
        f"(hidden {HIDDEN}, intermediate {INTER}, vocab {VOCAB}), rank-16 LoRA on all 7 linear "
        "modules of every layer with random nonzero B; each tool in its own process, peak RSS and "
        "wall time from `/usr/bin/time -v`; files in the page cache (warm) for every run. "
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, Python "
        f"{platform.python_version()}.",
        "",
        "| model | tool | wall (s) | peak RSS | RSS vs PEFT | wall vs PEFT | wall vs copy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"{r['layers']} layers, {r['size'] / 1e9:.2f} GB"
        for tool, label in (("adaptedit", "adaptedit merge --no-verify"),
                            ("peft", "PEFT merge_and_unload + save_pretrained"),
                            ("copy", "read + write copy (I/O floor)")):
            m = r[tool]
            lines.append(f"| {name} | {label} | {m['wall']:.1f} | {gib(m['rss'])} | "
                         f"{m['rss'] / r['peft']['rss']:.0%} | {m['wall'] / r['peft']['wall']:.2f}× | "
                         f"{m['wall'] / r['copy']['wall']:.2f}× |")
    lines.append("")
    checks = []
    for r in rows:
        a, p, c = r["adaptedit"], r["peft"], r["copy"]
        checks.append(
            f"- {r['size'] / 1e9:.2f} GB: merged tensors identical to PEFT's: "
            f"{'yes' if r['identical'] else 'NO'}; RSS ≤ 25% of PEFT: "
            f"{'met' if a['rss'] <= 0.25 * p['rss'] else 'MISSED'} ({a['rss'] / p['rss']:.0%}); "
            f"RSS < 1.5 GiB: {'met' if a['rss'] < 1.5 * 2**30 else 'MISSED'}; wall ≤ PEFT: "
            f"{'met' if a['wall'] <= p['wall'] else 'MISSED'}; within 1.5× of the copy: "
            f"{'met' if a['wall'] <= 1.5 * c['wall'] else 'MISSED'} ({a['wall'] / c['wall']:.2f}×)")
    lines += ["Targets:", ""] + checks + [""]
    lines += [
        "Where the time and memory go (profiled on this machine): a fixed cost of about 2 s per "
        "run (Python + torch import ≈ 1.5 s, the CLI, the safetensors headers), then "
        "the shard writes at about 0.5–0.6 GB/s, about as fast as the whole "
        "read + write copy, plus the merge arithmetic (B@A and the casts, ≈ 1 s per GB on 2 cores). "
        "So the 1.5× of the copy cannot be met with the bytes written and the arithmetic done on "
        "the same two cores; a writer thread overlapping compute and writes gained under 10% in a "
        "test and was not kept. Output shards are streamed tensor by tensor "
        "(`shards.write_safetensors`), so peak RSS is flat in both the model size and "
        "`--max-shard-size`: the torch import (≈ 0.23 GiB) + the largest tensor (raw and a few "
        "float32 copies when it is merged); the 25%-of-PEFT target is met once PEFT's footprint "
        "(≈ 1.15× the model + 0.3 GiB here) is more than 4× that floor.",
        "",
    ]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## merge\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


if __name__ == "__main__":
    main()
