"""Benchmark `adaptedit inspect` on the embedded SmolLM2-135M (210 linear modules).

    .venv/bin/python benchmarks/bench_inspect.py [--rank 16] [--keep DIR] [--cold-only]

1. adapter mode: a rank-16 PiSSA and a rank-16 LoRA adapter (init, then B perturbed), every module;
   once with an empty SVD cache (W₀'s exact SVDs computed and written), then warm (best of 2).
2. two-checkpoint mode: a perturbed copy of SmolLM2 as "tuned" (W + ΔW of the PiSSA adapter plus
   small dense noise: a full-rank update), every module, warm cache.

Each measurement is the library call (what `adaptedit inspect` runs after argument parsing), in this
process, with torch's default 2 threads on the 2-core machines. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def perturbed_adapter(source, method: str, rank: int, folder: Path, seed: int = 0) -> Path:
    from adaptedit.init import InitOptions, build

    ad = build(source, InitOptions(method=method, rank=rank, svd="randomized" if method == "pissa"
                                   else "auto", seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    for t in ad.tensors.values():
        b = t["lora_B"]
        scale = 1e-3 if method == "lora" else 1e-2 * float(b.abs().mean())
        t["lora_B"] = b + scale * torch.randn(b.shape, generator=g)
    ad.save(folder)
    return folder


def tuned_copy(source, adapter_folder: Path, out: Path, noise: float = 1e-4) -> Path:
    """Copy the base folder; targeted weights become W + ΔW + noise·N(0, 1) (full-rank part)."""
    from safetensors.torch import load_file, save_file

    from adaptedit.formats import load_adapter
    from adaptedit.targets import from_w, to_w

    shutil.copytree(source.path, out)
    ad = load_adapter(adapter_folder)
    state = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(3)
    for name in ad.names:
        info = ad.config.modules[name]
        w = to_w(state[info.key], info.kind).float()
        w1 = w + ad.delta_w(name, w) + noise * torch.randn(w.shape, generator=g)
        state[info.key] = from_w(w1, info.kind).to(state[info.key].dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: temp)")
    ap.add_argument("--cold-only", action="store_true", help="only the cold and one warm PiSSA run")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-inspect-"))
    work.mkdir(parents=True, exist_ok=True)
    from adaptedit import analysis
    from adaptedit.models import cache_dir, resolve

    t0 = time.perf_counter()
    source = resolve(None)
    print(f"resolve(None): {time.perf_counter() - t0:.1f} s  ({source.path})", file=sys.stderr)
    rows = []
    pissa = perturbed_adapter(source, "pissa", args.rank, work / "pissa")
    lora = perturbed_adapter(source, "lora", args.rank, work / "lora")

    svd_dir = cache_dir() / "svd"
    shutil.rmtree(svd_dir, ignore_errors=True)  # cold: W₀'s SVDs computed and cached
    cold, rep = timed(lambda: analysis.inspect_adapters([pissa]))
    rows.append(("adapter, pissa r16, cold SVD cache", len(rep["modules"]), cold, rep["verdict"]))
    warm, rep = timed(lambda: analysis.inspect_adapters([pissa]), repeat=1 if args.cold_only else 2)
    rows.append(("adapter, pissa r16, warm cache", len(rep["modules"]), warm, rep["verdict"]))
    size = sum(p.stat().st_size for p in svd_dir.glob("*.safetensors"))
    if not args.cold_only:
        warm, rep = timed(lambda: analysis.inspect_adapters([lora]), repeat=2)
        rows.append(("adapter, lora r16, warm cache", len(rep["modules"]), warm, rep["verdict"]))
        tuned = tuned_copy(source, pissa, work / "tuned")
        two, rep = timed(lambda: analysis.inspect_checkpoints(str(source.path), str(tuned)))
        rows.append(("two checkpoints (dense ΔW), warm cache", len(rep["modules"]), two,
                     rep["verdict"]))

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; SVD cache "
          f"{size / 1e6:.0f} MB for {len(list(svd_dir.glob('*.safetensors')))} weights\n")
    print("| run | modules | seconds | verdict |\n|---|---|---|---|")
    for name, n, sec, verdict in rows:
        print(f"| {name} | {n} | {sec:.2f} | {verdict} |")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
