"""Checks shared by the orthogonal methods' tests (test_oft.py, test_hra.py)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from helpers import chat_rows, logits, perturb

from adaptedit import train as training
from adaptedit.adapter import save_adapter
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build
from adaptedit.layer import attach
from adaptedit.models import resolve
from adaptedit.peft_io import export_peft
from adaptedit.train_config import make_config


def peft_logits(base: Path, folder: Path) -> torch.Tensor:
    from peft import PeftModel

    warnings.filterwarnings("ignore")
    model = PeftModel.from_pretrained(resolve(str(base)).load(dtype=torch.float32), folder)
    return logits(model.eval())


def export_matches_peft(base: Path, tmp: Path, scale: float = 0.2, **kw) -> dict:
    """Export a perturbed adapter; PEFT's logits equal adaptedit's within 1e-5 (float32).
    Returns the written adapter_config.json."""
    ad = perturb(build(resolve(str(base)), InitOptions(**kw)), seed=1, scale=scale)
    ours = logits(attach(resolve(str(base)).load(dtype=torch.float32), ad))
    export_peft(ad, tmp / "peft")
    assert (ours - logits(resolve(str(base)).load())).abs().max() > 1e-2  # the update matters
    assert (peft_logits(base, tmp / "peft") - ours).abs().max() <= 1e-5
    return json.loads((tmp / "peft" / "adapter_config.json").read_text())


def _train(folder, data, out, resume=False, **kw):
    cfg, given = make_config({"data": str(data), **kw}, resume=resume)
    return training.train(training.prepare(folder, cfg, given=given, out=out, resume=resume))


def train_and_resume_exact(base: Path, tmp: Path, lr: float = 1e-2, **kw) -> dict:
    """Loss falls over 6 steps; a run resumed from its step-3 checkpoint ends bit-identical."""
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    save_adapter(build(resolve(str(base)), InitOptions(**kw)), tmp / "ad")
    opts = dict(steps=6, batch_size=4, lr=lr, lr_schedule="constant", save_every=3)
    summary = _train(tmp / "ad", data, tmp / "ref", **opts)
    assert summary["final_loss"] < summary["first_loss"], summary
    _train(tmp / "ad", data, tmp / "cut", **opts)
    shutil.rmtree(tmp / "cut" / "checkpoints" / "step-000006")
    _train(tmp / "ad", data, tmp / "cut", resume=True)
    ref, got = load_adapter(tmp / "ref"), load_adapter(tmp / "cut")
    for name, ts in ref.tensors.items():
        for k, v in ts.items():
            assert torch.equal(v, got.tensors[name][k]), (name, k)
    return summary


def merge_matches_adapter(base: Path, tmp: Path, **kw) -> None:
    """merge (verification on) writes W' whose model gives the adapter model's logits (1e-5)."""
    from helpers import load_merged

    from adaptedit.merge import MergeOptions, merge

    ad = perturb(build(resolve(str(base)), InitOptions(**kw)), seed=2, scale=0.2)
    ad.save(tmp / "ad")
    ad = load_adapter(tmp / "ad")
    res = merge([ad], tmp / "m", opts=MergeOptions(dtype="fp32"))
    assert res.verified and res.max_abs_logit_diff <= 1e-5 and res.tensors_merged == len(ad.names)
    ref = logits(attach(resolve(str(base)).load(dtype=torch.float32), ad))
    assert (ref - logits(resolve(str(base)).load())).abs().max() > 1e-2  # the update matters
    assert (ref - logits(load_merged(tmp / "m"))).abs().max() <= 1e-5
