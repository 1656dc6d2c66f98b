"""compare vs separate processes: wall time and peak memory on the embedded SmolLM2-135M.

    .venv/bin/python benchmarks/bench_compare.py [--steps 3] [--out /tmp/bench-compare]

One `adaptedit compare` of 4 SVD-initialised runs (PiSSA and MiLoRA × 2 seeds, exact SVD, all 210
linear modules) against the same 4 runs as separate `adaptedit init` + `adaptedit train` processes —
the very commands the compare records for each run (``commands`` in results.jsonl) — and, for
equal work, the same plus `adaptedit inspect --trajectory` per run (compare inspects every run).
Each process is timed from the outside (wall clock) and its peak RSS read from ``wait4``.
Targets (issue 13): compare ≤ 0.8× the separate processes; compare's peak RSS ≤ 1.2× that of the
largest single `train`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if status != 0:
        sys.exit(f"failed: {' '.join(map(str, argv))}\n{p.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/bench-compare")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = ROOT / "examples/arithmetic"
    (out / "valid8.jsonl").write_text("".join((data / "valid.jsonl").read_text()
                                              .splitlines(keepends=True)[:8]))
    py = [sys.executable, "-m", "adaptedit"]
    cmp_wall, cmp_rss = run(py + ["compare", "--data", str(data / "train.jsonl"),
                                  "--eval-data", str(out / "valid8.jsonl"),
                                  "--methods", "pissa,milora", "--seeds", "1,2", "--lr", "1e-3",
                                  "--steps", str(args.steps), "--batch-size", "4",
                                  "--max-length", "80", "--rank", "16", "--svd", "full",
                                  "-o", str(out / "cmp"), "-q"])
    recs = [json.loads(x) for x in (out / "cmp/results.jsonl").read_text().splitlines()]
    sep = {"init": [], "train": [], "inspect": []}
    for r in recs:
        folder = r["path"]
        mine = str(out / "sep" / r["run"])
        for kind in ("init", "train"):
            argv = [a if a != folder else mine for a in shlex.split(r["commands"][kind])[1:]]
            sep[kind].append(run(py + argv + ["-q"]))
        sep["inspect"].append(run(py + ["inspect", mine, "--trajectory", "--json"]))
    init_train = sum(w for k in ("init", "train") for w, _ in sep[k])
    with_inspect = init_train + sum(w for w, _ in sep["inspect"])
    train_rss = max(m for _, m in sep["train"])
    print(json.dumps({
        "runs": len(recs), "steps": args.steps,
        "compare_s": round(cmp_wall, 1), "separate_init_train_s": round(init_train, 1),
        "separate_init_train_inspect_s": round(with_inspect, 1),
        "ratio_vs_init_train": round(cmp_wall / init_train, 3),
        "ratio_vs_init_train_inspect": round(cmp_wall / with_inspect, 3),
        "compare_peak_rss_mib": round(cmp_rss), "largest_train_peak_rss_mib": round(train_rss),
        "rss_ratio": round(cmp_rss / train_rss, 3),
        "per_process_s": {k: [round(w, 1) for w, _ in v] for k, v in sep.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
