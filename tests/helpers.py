"""Helpers shared by the tests (import as `from helpers import ...`)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from safetensors.torch import load_file

from adaptedit.methods import METHODS as REGISTRY
from adaptedit.train_config import make_config

# every method of the registry: a new method is tested by adding it there
METHODS = list(REGISTRY)
# (method, dora) pairs that exist: DoRA on top of every method that does not refuse it (DORA)
WITH_DORA = [(m, d) for m in METHODS for d in (False, True)
             if not (d and isinstance(getattr(REGISTRY[m].impl, "DORA", None), str))]
# the methods whose PEFT form is a LoRA (the low-rank family); the others have their own tests
LORA_FAMILY = [m for m in METHODS if getattr(REGISTRY[m].PEFT, "peft_type", None) == "LORA"]
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run `adaptedit ARGS` in-process; returns (exit code, stdout, stderr)."""
    from adaptedit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def perturb(adapter, seed: int = 0, scale: float = 0.05):
    """Move every trainable tensor of any method away from θ₀, as training would (seeded).

    Tensors whose values are all positive (DoRA magnitudes, DeLoRA's λ: norms and scales) are
    multiplied by exp(scale·N(0,1)) so they stay positive; the others get + scale·N(0,1).
    """
    g = torch.Generator().manual_seed(seed)
    for t in adapter.tensors.values():
        for k in adapter.trainable_names():
            x = t[k]
            noise = scale * torch.randn(x.shape, generator=g, dtype=torch.float32)
            if x.numel() and bool((x > 0).all()):
                t[k] = (x.float() * noise.exp()).to(x.dtype)
            else:
                t[k] = (x.float() + noise).to(x.dtype)
    return adapter


def make_adapter(base: Path, folder: Path, *, method="lora", dora=False, rank=4, seed=0,
                 trained=True, **kw) -> Path:
    """init an adapter on ``base`` (perturbed unless trained=False) and save it to ``folder``."""
    from adaptedit.init import InitOptions, build
    from adaptedit.models import resolve

    if not REGISTRY[method].RANKED:
        rank = None  # a method without a rank (IA3, RoAd) refuses one
    ad = build(resolve(str(base)), InitOptions(method=method, dora=dora, rank=rank, seed=seed, **kw))
    if trained:
        perturb(ad, seed)
    ad.save(folder)
    return folder


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return (out.logits if getattr(out, "logits", None) is not None else out[0]).float()


def load_merged(folder: Path):
    """A merged folder loaded with plain transformers; no missing or unexpected keys."""
    from adaptedit.models import resolve

    src = resolve(str(folder))
    model, info = src.model_class().from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def tensors(folder: Path) -> dict:
    """All tensors of the *.safetensors files of a folder."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat rows of two-number sums (user question, assistant answer), seeded."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    return rows


def train_and_resume(base: Path, tmp_path: Path, opts, steps: int = 6, lr: float = 5e-2):
    """Train a fresh adapter of ``opts`` (an InitOptions) for ``steps`` steps with a checkpoint every
    ``steps // 2``, then resume a copy from that checkpoint. Returns (summary of the uninterrupted
    run, its final tensors, the resumed run's final tensors); the adapter's θ₀ is in tmp_path/ad."""
    import json
    import shutil

    from adaptedit import train as training
    from adaptedit.adapter import save_adapter
    from adaptedit.init import build
    from adaptedit.models import resolve

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    save_adapter(build(resolve(str(base)), opts), tmp_path / "ad")

    def run(out, resume=False, **kw):
        cfg, given = make_config({"data": str(data), **kw}, resume=resume)
        return training.train(training.prepare(tmp_path / "ad", cfg, given=given, out=out,
                                               resume=resume))

    half = f"step-{steps // 2:06d}"
    summary = run(tmp_path / "ref", steps=steps, batch_size=4, lr=lr, save_every=steps // 2,
                  lr_schedule="constant")
    shutil.copytree(tmp_path / "ref" / "checkpoints" / half, tmp_path / "cut" / "checkpoints" / half)
    run(tmp_path / "cut", resume=True)
    return (summary, load_file(str(tmp_path / "ref" / "adapter.safetensors")),
            load_file(str(tmp_path / "cut" / "adapter.safetensors")))


def init_is_identity(base: Path, dtype: torch.dtype, **kw) -> None:
    """The adapted model's logits equal the base's bit for bit at init."""
    from adaptedit.init import InitOptions, build
    from adaptedit.layer import attach
    from adaptedit.models import resolve

    ad = build(resolve(str(base)), InitOptions(**kw))
    ref = logits(resolve(str(base)).load(dtype=dtype))
    got = logits(attach(resolve(str(base)).load(dtype=dtype), ad))
    assert got.dtype == ref.dtype and torch.equal(ref, got), kw


# A chat template unlike the fixtures' ChatML: "### role:" headers, the EOS after each answer
PLAIN_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}"
                  "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                  "{% if add_generation_prompt %}### assistant:\n{% endif %}")
