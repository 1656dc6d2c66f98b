"""(IA)³ (adaptedit.methods.ia3): PEFT's default targets and sides, identity at init bit for bit
(fp32, bf16, GPT-2 Conv1D), forward = merged weights, PEFT IA3 export with PEFT's logits (1e-5
fp32, bit-identical bf16), exact resume, inspect's gain distribution, the refusal where PEFT's
IA3 computes another function (an output-side module with a bias)."""

from __future__ import annotations

import json
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


def _gains(ad, seed=0):
    """Gains away from 1 (all positive), as training would leave them."""
    g = torch.Generator().manual_seed(seed)
    for t in ad.tensors.values():
        t["ia3_l"] = torch.exp(0.2 * torch.randn(t["ia3_l"].shape, generator=g))
    return ad


def test_default_targets_and_sides_are_pefts(tiny_llama, tiny_gpt2):
    ad = build(resolve(str(tiny_llama)), InitOptions(method="ia3"))
    types = {n.rsplit(".", 1)[-1] for n in ad.names}
    assert types == {"k_proj", "v_proj", "down_proj"} and len(ad.names) == 6
    assert ad.config.targets == "k_proj,v_proj,down_proj,c_attn,mlp.c_proj"
    for n, t in ad.tensors.items():
        out_f, in_f = ad.config.modules[n].shape
        inp = n.endswith("down_proj")
        assert float(t["ia3_input"]) == float(inp)
        assert t["ia3_l"].shape == ((in_f,) if inp else (out_f,))
        assert torch.equal(t["ia3_l"], torch.ones_like(t["ia3_l"]))
    g = build(resolve(str(tiny_gpt2)), InitOptions(method="ia3"))
    assert {n.split(".", 3)[-1] for n in g.names} == {"attn.c_attn", "mlp.c_proj"}
    # an explicit --targets is applied as given
    q = build(resolve(str(tiny_llama)), InitOptions(method="ia3", targets="q_proj"))
    assert all(n.endswith("q_proj") for n in q.names)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init_bit_exact(fixture, dtype, request):
    init_is_identity(request.getfixturevalue(fixture), dtype, method="ia3", targets="all-linear")


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_forward_equals_merged_weights(fixture, request, tmp_path):
    """The adapted model and the merged checkpoint give the same logits (1e-5); W' equals the
    float64 diag(l) W / W diag(l) exactly after rounding."""
    folder = request.getfixturevalue(fixture)
    ad = _gains(build(resolve(str(folder)), InitOptions(method="ia3", targets="all-linear")))
    save_adapter(ad, tmp_path / "ad")
    ad = load_adapter(tmp_path / "ad")
    src = resolve(str(folder))
    for name, info in ad.config.modules.items():
        w = src.checkpoint.get(info.key).float()
        w = w.t() if info.kind == "conv1d" else w
        t = ad.tensors[name]
        lv = t["ia3_l"].double()
        ref = w.double() * (lv[None, :] if float(t["ia3_input"]) else lv[:, None])
        assert torch.equal(ad.merged(name, w), ref.float())
    res = merge([ad], tmp_path / "m", opts=MergeOptions())  # verified against the adapter model
    assert res.verified and res.max_abs_logit_diff <= 1e-5
    from helpers import load_merged

    ref = logits(attach(src.load(dtype=torch.float32), ad))
    assert (logits(load_merged(tmp_path / "m")) - ref).abs().max() <= 1e-5


def _peft_logits(base, folder, dtype):
    from peft import PeftModel

    warnings.filterwarnings("ignore")
    return logits(PeftModel.from_pretrained(resolve(str(base)).load(dtype=dtype), folder).eval())


def test_export_peft_ia3_same_logits(tiny_llama, tmp_path):
    ad = _gains(build(resolve(str(tiny_llama)), InitOptions(method="ia3")))
    save_adapter(ad, tmp_path / "ad")
    code, _, err = run_cli(["export", str(tmp_path / "ad"), "--format", "peft",
                            "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and len(cfg["target_modules"]) == 6
    assert cfg["feedforward_modules"] == [n for n in sorted(ad.names) if n.endswith("down_proj")]
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.0.mlp.down_proj.ia3_l"].shape == (1, 64)
    assert keys["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (16, 1)
    ad = load_adapter(tmp_path / "ad")
    ours = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    assert (_peft_logits(tiny_llama, tmp_path / "p", torch.float32) - ours).abs().max() <= 1e-5
    # bf16: the same operations as PEFT (y₀·l in float32 rounded once; (x·l) rounded, then W)
    ours16 = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.bfloat16), ad))
    assert torch.equal(_peft_logits(tiny_llama, tmp_path / "p", torch.bfloat16), ours16)


def test_export_gpt2_input_side_conv1d(tiny_gpt2, tmp_path):
    ad = _gains(build(resolve(str(tiny_gpt2)), InitOptions(method="ia3", targets="mlp.c_proj")))
    export_peft(ad, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"]
    ours = logits(attach(resolve(str(tiny_gpt2)).load(dtype=torch.float32), ad))
    assert (_peft_logits(tiny_gpt2, tmp_path / "p", torch.float32) - ours).abs().max() <= 1e-5


def test_export_refuses_output_side_module_with_bias(tiny_gpt2, tmp_path):
    ad = _gains(build(resolve(str(tiny_gpt2)), InitOptions(method="ia3")))  # c_attn has a bias
    with pytest.raises(AdapteditError, match="c_attn: PEFT's IA3 scales an output-side module's"):
        export_peft(ad, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_inspect_reports_the_gain_distribution(tiny_llama, tmp_path):
    ad = _gains(build(resolve(str(tiny_llama)), InitOptions(method="ia3")), seed=1)
    save_adapter(ad, tmp_path / "ad")
    code, out, err = run_cli(["inspect", str(tmp_path / "ad"), "--json", "-q"])
    assert code == 0, err
    rep = json.loads(out)
    rec = next(r for r in rep["modules"] if r["name"] == "model.layers.1.mlp.down_proj")
    lv = ad.tensors["model.layers.1.mlp.down_proj"]["ia3_l"].double()
    m = rec["method"]
    assert m["ia3_side"] == "input" and abs(m["gain_mean"] - float(lv.mean())) <= 1e-12
    assert abs(m["gain_std"] - float(lv.std())) <= 1e-12
    assert (m["gain_min"], m["gain_max"]) == (float(lv.min()), float(lv.max()))
    assert rep["by_type"]["down_proj"]["method"]["gain_mean"] == pytest.approx(
        (float(lv.mean()) + float(ad.tensors["model.layers.0.mlp.down_proj"]["ia3_l"].double()
                                  .mean())) / 2, abs=1e-12)


