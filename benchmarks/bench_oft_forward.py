"""OFT's forward: rotate the activations (what methods/oft.py does) or build W' = W Rᵀ block-wise
and multiply once? Forward + backward of one layer per SmolLM2-135M shape, CPU, fp32.

    .venv/bin/python benchmarks/bench_oft_forward.py [--tokens 1024] [--block-size 32] [--repeat 5]

Both compute the same y (checked to 1e-4 relative); prints the median time of each and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from adaptedit.methods import oft

SHAPES = {"q_proj / o_proj": (576, 576), "k_proj / v_proj": (192, 576),
          "gate_proj / up_proj": (1536, 576), "down_proj": (576, 1536)}


def _time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[repeat // 2]  # the first call warms up


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.tokens} tokens, "
          f"b = {a.block_size}; forward + backward, median of {a.repeat}\n")
    print("| module | rotate activations ms | build W' ms | W' / activations |\n|---|---|---|---|")
    for name, (out_f, in_f) in SHAPES.items():
        n, bs = in_f // a.block_size, a.block_size
        w = torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5
        q = (0.01 * torch.randn(n, bs * (bs - 1) // 2, generator=gen)).requires_grad_()
        x = torch.randn(a.tokens, in_f, generator=gen, requires_grad=True)
        g = torch.randn(a.tokens, out_f, generator=gen)

        def rotation():
            eye = torch.eye(bs)
            s = oft.skew(q, bs)
            return torch.linalg.solve(eye + s, eye - s, left=False)

        def activations():
            y = oft.rotate(x, rotation()) @ w.T
            y.backward(g)
            return y

        def weight():
            r = rotation()
            wr = torch.einsum("onk,nck->onc", w.reshape(out_f, n, bs), r).reshape(out_f, in_f)
            y = x @ wr.T
            y.backward(g)
            return y

        ya, yw = activations(), weight()
        assert torch.allclose(ya, yw, rtol=1e-4, atol=1e-5), name
        t_a, t_w = _time(activations, a.repeat), _time(weight, a.repeat)
        print(f"| {name} ({out_f}×{in_f}) | {1e3 * t_a:.1f} | {1e3 * t_w:.1f} | {t_w / t_a:.2f} |")


if __name__ == "__main__":
    main()
