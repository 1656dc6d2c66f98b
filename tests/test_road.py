"""RoAd variant 1 (adaptedit.methods.road): group size from the targets, identity at init bit for
bit (fp32, bf16, GPT-2 Conv1D), forward = merged weights, PEFT ROAD export with PEFT's logits (1e-5
fp32, bit-identical bf16), refusals, exact resume."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from helpers import init_is_identity, logits, run_cli

from adaptedit.adapter import save_adapter
from adaptedit.errors import AdapteditError
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build
from adaptedit.layer import attach
from adaptedit.merge import MergeOptions, merge
from adaptedit.models import resolve
from adaptedit.peft_io import export_peft


def _trained(ad, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in ad.tensors.values():
        t["road_theta"] = 0.3 * torch.randn(t["road_theta"].shape, generator=g)
        t["road_alpha"] = torch.exp(0.2 * torch.randn(t["road_alpha"].shape, generator=g))
    return ad


def _reference_w(w, t):
    """R W in float64 from the pairing rule (k with k + g/2 in each group of g)."""
    g = int(t["road_group"])
    out = w.double().clone()
    th, al = t["road_theta"].double(), t["road_alpha"].double()
    p = 0
    for start in range(0, w.shape[0], g):
        for k in range(g // 2):
            i, j = start + k, start + k + g // 2
            c, s = al[p] * math.cos(th[p]), al[p] * math.sin(th[p])
            out[i], out[j] = c * w[i].double() - s * w[j].double(), s * w[i].double() + c * w[j].double()
            p += 1
    return out


def test_group_size_and_merged_reference(tiny_llama):
    src = resolve(str(tiny_llama))
    ad = _trained(build(src, InitOptions(method="road", targets="all-linear")))
    assert ad.config.init["group_size"] == 16  # gcd of 16, 32, 64 outputs, ≤ PEFT's 64
    for name in ad.names[:3]:
        info = ad.config.modules[name]
        w = src.checkpoint.get(info.key).float()
        ref = _reference_w(w, ad.tensors[name])
        assert (ad.merged(name, w).double() - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_a_given_group_size_is_used_and_exported(tiny_llama, tmp_path):
    """--group-size 8 (PEFT's group_size) was overwritten by the default (16 here): now it pairs
    k with k + 4 in each group of 8, merges to the float64 reference and exports to PEFT's logits."""
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "road", "--group-size", "8",
                            "-o", str(tmp_path / "ad"), "-q"])
    assert code == 0, err
    ad = load_adapter(tmp_path / "ad")
    assert ad.config.init["group_size"] == 8
    _trained(ad)
    src = resolve(str(tiny_llama))
    for name in ad.names:
        assert int(ad.tensors[name]["road_group"]) == 8
        w = src.checkpoint.get(ad.config.modules[name].key).float()
        ref = _reference_w(w, ad.tensors[name])
        assert (ad.merged(name, w).double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    export_peft(ad, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["group_size"] == 8
    ours = logits(attach(src.load(dtype=torch.float32), ad))
    assert (_peft_logits(tiny_llama, tmp_path / "p", torch.float32) - ours).abs().max() <= 1e-5


@pytest.mark.parametrize("size", ["6", "3", "0", "128"])
def test_a_group_size_that_does_not_fit_is_refused(size, tiny_llama, tmp_path):
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "road", "--group-size", size,
                            "-o", str(tmp_path / "ad")])
    assert code == 1 and err.startswith(f"error: --group-size {size}: RoAd pairs output"), err
    assert "choose an even divisor of 16" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init_bit_exact(fixture, dtype, request):
    init_is_identity(request.getfixturevalue(fixture), dtype, method="road")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_forward_equals_merged_weights(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    src = resolve(str(folder))
    save_adapter(_trained(build(src, InitOptions(method="road"))), tmp_path / "ad")
    ad = load_adapter(tmp_path / "ad")
    res = merge([ad], tmp_path / "m", opts=MergeOptions())
    assert res.verified and res.max_abs_logit_diff <= 1e-5
    from helpers import load_merged

    ref = logits(attach(src.load(dtype=torch.float32), ad))
    assert (logits(load_merged(tmp_path / "m")) - ref).abs().max() <= 1e-5


def _peft_logits(base, folder, dtype):
    from peft import PeftModel

    warnings.filterwarnings("ignore")
    return logits(PeftModel.from_pretrained(resolve(str(base)).load(dtype=dtype), folder).eval())


def test_export_peft_road_same_logits(tiny_llama, tmp_path):
    save_adapter(_trained(build(resolve(str(tiny_llama)), InitOptions(method="road"))),
                 tmp_path / "ad")
    code, _, err = run_cli(["export", str(tmp_path / "ad"), "--format", "peft",
                            "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ROAD" and cfg["group_size"] == 16 and cfg["variant"] == "road_1"
    ad = load_adapter(tmp_path / "ad")
    ours = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    assert (_peft_logits(tiny_llama, tmp_path / "p", torch.float32) - ours).abs().max() <= 1e-5
    ours16 = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.bfloat16), ad))
    assert torch.equal(_peft_logits(tiny_llama, tmp_path / "p", torch.bfloat16), ours16)


def test_export_refused_for_conv1d_and_rank(tiny_gpt2, tiny_llama, tmp_path):
    ad = _trained(build(resolve(str(tiny_gpt2)), InitOptions(method="road")))
    with pytest.raises(AdapteditError, match="Conv1D \\(PEFT's RoAd wraps nn.Linear only\\)"):
        export_peft(ad, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "road", "--rank", "4",
                            "-o", str(tmp_path / "x"), "-q"])
    assert code != 0 and "--rank does not apply to road" in err and "Traceback" not in err


