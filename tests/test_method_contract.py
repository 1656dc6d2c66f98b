"""The contract every entry of the method registry keeps, with and without DoRA.

A new method is tested by adding it to ``adaptedit.methods.METHODS``:

- identity at θ₀: the adapted model's logits are bit-identical to the base's, in float32 and bf16;
- forward = merged weights: with every trainable tensor moved away from θ₀, the adapted model and
  the merged checkpoint give the same logits (float32, within 1e-5);
- export: PEFT loads the exported folder and gives the same logits (within 1e-5), or the export
  is refused with a one-line message;
- resume: 4 steps in one run, and 2 steps + stop + resume for 2, give identical tensors.
"""

from __future__ import annotations

import json
import random
import warnings

import fixtures
import pytest
import torch
from helpers import WITH_DORA, load_merged, logits, make_adapter, tensors

from adaptedit import train as training
from adaptedit.checkpoints import STATE_TENSORS, checkpoint_dirs
from adaptedit.errors import AdapteditError
from adaptedit.formats import load_adapter
from adaptedit.layer import attach
from adaptedit.merge import MergeOptions, merge
from adaptedit.models import resolve
from adaptedit.peft_io import export_peft
from adaptedit.train_config import make_config

VARIANTS = [v for v in WITH_DORA if not v[1]] + [v for v in WITH_DORA if v[1]]  # +dora where defined
IDS = [f"{m}+dora" if d else m for m, d in VARIANTS]


@pytest.fixture(scope="module")
def tiny_llama_bf16(tmp_path_factory):
    return fixtures.make_tiny_llama(tmp_path_factory.mktemp("contract_bf16"), dtype=torch.bfloat16)


@pytest.mark.parametrize("method,dora", VARIANTS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_identity_at_init_is_bit_exact(tiny_llama, tiny_llama_bf16, tmp_path, method, dora, dtype):
    base = tiny_llama if dtype == torch.float32 else tiny_llama_bf16
    ad = load_adapter(make_adapter(base, tmp_path / "ad", method=method, dora=dora,
                                   trained=False))
    want = logits(resolve(str(base)).load(dtype=dtype))
    got = logits(attach(resolve(str(base)).load(dtype=dtype), ad))
    assert torch.equal(got, want)


@pytest.mark.parametrize("method,dora", VARIANTS, ids=IDS)
def test_forward_equals_merged_weights(tiny_llama, tmp_path, method, dora):
    ad = load_adapter(make_adapter(tiny_llama, tmp_path / "ad", method=method, dora=dora))
    base = logits(resolve(str(tiny_llama)).load(dtype=torch.float32))
    adapted = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    assert (adapted - base).abs().max() > 1e-3  # the perturbation reaches the output
    merge([ad], tmp_path / "m", opts=MergeOptions(verify=False, dtype="fp32"))
    merged = logits(load_merged(tmp_path / "m"))
    assert (merged - adapted).abs().max() <= 1e-5


@pytest.mark.parametrize("method,dora", VARIANTS, ids=IDS)
def test_export_is_exact_or_refused(tiny_llama, tmp_path, method, dora):
    from peft import PeftModel

    ad = load_adapter(make_adapter(tiny_llama, tmp_path / "ad", method=method, dora=dora))
    try:
        export_peft(ad, tmp_path / "p")
    except AdapteditError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg.strip(), msg  # one line that says why
        assert not (tmp_path / "p").exists()
        return
    want = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        peft = PeftModel.from_pretrained(resolve(str(tiny_llama)).load(dtype=torch.float32),
                                         tmp_path / "p")
    assert (logits(peft.eval()) - want).abs().max() <= 1e-5


def _rows(n: int) -> str:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        out.append(json.dumps({"prompt": f"{a} plus {b} is", "completion": f" {a + b}."}) + "\n")
    return "".join(out)


def _train(folder, data, *, out=None, resume=False, stop=None):
    cfg, given = make_config({"data": str(data), "steps": 4, "batch_size": 4, "lr": 1e-2,
                              "save_every": 0}, resume=resume)
    run = training.prepare(folder, cfg, given=given, out=out, resume=resume)
    return training.train(run, stop=stop)


@pytest.mark.parametrize("method,dora", VARIANTS, ids=IDS)
def test_resume_is_exact(tiny_llama, tmp_path, method, dora):
    from safetensors.torch import load_file

    data = tmp_path / "train.jsonl"
    data.write_text(_rows(16))
    ad = make_adapter(tiny_llama, tmp_path / "ad", method=method, dora=dora, trained=False)
    _train(ad, data, out=tmp_path / "whole")

    calls = []

    def stop_before_step_3() -> bool:  # called before every step
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(training.Interrupted) as info:
        _train(ad, data, out=tmp_path / "split", stop=stop_before_step_3)
    assert info.value.step == 2 and checkpoint_dirs(tmp_path / "split")[-1].name == "step-000002"
    _train(ad, data, out=tmp_path / "split", resume=True)

    whole, split = tensors(tmp_path / "whole"), tensors(tmp_path / "split")
    assert whole.keys() == split.keys()
    moved = tensors(ad)
    for k in whole:
        assert torch.equal(whole[k], split[k]), k
    trainable = load_adapter(ad).trainable_names()
    assert any(not torch.equal(whole[k], moved[k]) for k in whole
               if k.rsplit(".", 1)[-1] in trainable)  # training moved θ
    for k in whole:  # and nothing else: θ₀ copies, frozen bases and buffers stay as saved
        if k.rsplit(".", 1)[-1] not in trainable:
            assert torch.equal(whole[k], moved[k]), k
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "step-000004" / STATE_TENSORS))
    b = load_file(str(tmp_path / "split" / "checkpoints" / "step-000004" / STATE_TENSORS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
