"""VeRA (adaptedit.methods.vera): shared A*, B* equal PEFT's regeneration from the key, identity at
init bit for bit (fp32, bf16, GPT-2 Conv1D), forward = merged weights, PEFT VERA export with
PEFT's logits (1e-5 fp32), exact resume, the refusals (--alpha, --rank-pattern)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import init_is_identity, logits, run_cli

from adaptedit.adapter import save_adapter
from adaptedit.errors import UsageError
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build
from adaptedit.layer import attach
from adaptedit.merge import MergeOptions, merge
from adaptedit.models import resolve
from adaptedit.peft_io import export_peft


def _trained(ad, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in ad.tensors.values():
        t["vera_lambda_b"] = 0.3 * torch.randn(t["vera_lambda_b"].shape, generator=g)
        t["vera_lambda_d"] = t["vera_lambda_d"] + 0.2 * torch.randn(t["vera_lambda_d"].shape,
                                                                    generator=g)
    return ad


def test_defaults_and_shared_matrices_are_pefts(tiny_llama):
    from peft import VeraConfig, get_peft_model

    ad = build(resolve(str(tiny_llama)), InitOptions(method="vera"))
    info = next(iter(ad.config.modules.values()))
    assert ad.config.rank == 256 and info.rank == 256 and ad.config.init["vera_dims"] == [64, 64]
    t = ad.tensors["model.layers.0.self_attn.k_proj"]
    assert torch.equal(t["vera_lambda_b"], torch.zeros(16))
    assert torch.equal(t["vera_lambda_d"], torch.full((256,), 0.1))
    warnings.filterwarnings("ignore")
    pm = get_peft_model(resolve(str(tiny_llama)).load(dtype=torch.float32),
                        VeraConfig(r=256, target_modules="all-linear"))
    from adaptedit.methods import vera

    a, b = vera.shared(0, 256, 64, 64)
    layer = pm.base_model.model.model.layers[0].self_attn.k_proj
    assert torch.equal(layer.vera_A["default"], a) and torch.equal(layer.vera_B["default"], b)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init_bit_exact(fixture, dtype, request):
    init_is_identity(request.getfixturevalue(fixture), dtype, method="vera", rank=8)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_forward_equals_merged_weights(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    src = resolve(str(folder))
    ad = _trained(build(src, InitOptions(method="vera", rank=8)))
    save_adapter(ad, tmp_path / "ad")
    ad = load_adapter(tmp_path / "ad")
    from adaptedit.methods import vera

    for name, info in list(ad.config.modules.items())[:4]:  # ΔW against a float64 reference
        t = ad.tensors[name]
        a, b = (x.double() for x in vera.slices(t))
        ref = t["vera_lambda_b"].double()[:, None] * b @ (t["vera_lambda_d"].double()[:, None] * a)
        assert (ad.delta_w(name).double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    res = merge([ad], tmp_path / "m", opts=MergeOptions())
    assert res.verified and res.max_abs_logit_diff <= 1e-5
    from helpers import load_merged

    ref = logits(attach(src.load(dtype=torch.float32), ad))
    assert (logits(load_merged(tmp_path / "m")) - ref).abs().max() <= 1e-5


def _peft_logits(base, folder):
    from peft import PeftModel

    warnings.filterwarnings("ignore")
    return logits(PeftModel.from_pretrained(resolve(str(base)).load(dtype=torch.float32),
                                            folder).eval())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_export_peft_vera_same_logits(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    ad = _trained(build(resolve(str(folder)), InitOptions(method="vera", rank=8,
                                                          targets="all-linear")))
    save_adapter(ad, tmp_path / "ad")
    code, _, err = run_cli(["export", str(tmp_path / "ad"), "--format", "peft",
                            "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["r"] == 8 and cfg["projection_prng_key"] == 0
    ours = logits(attach(resolve(str(folder)).load(dtype=torch.float32), load_adapter(tmp_path / "ad")))
    assert (_peft_logits(folder, tmp_path / "p") - ours).abs().max() <= 1e-5


def test_refusals(tiny_llama, tmp_path):
    src = resolve(str(tiny_llama))
    with pytest.raises(UsageError, match="--alpha does not apply to vera"):
        build(src, InitOptions(method="vera", rank=8, alpha=16))
    with pytest.raises(UsageError, match="VeRA shares A and B"):
        build(src, InitOptions(method="vera", rank=8, rank_pattern="mlp=4"))
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "ia3", "--rank", "8",
                            "-o", str(tmp_path / "x"), "-q"])
    assert code != 0 and "--rank does not apply to ia3 (it has no rank); drop --rank" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()
    with pytest.raises(Exception, match="no exact PEFT form"):
        ad = _trained(build(src, InitOptions(method="vera", rank=8, dora=True)))
        export_peft(ad, tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("method,rank", [("ia3", None), ("vera", 8), ("svft", 4)])
def test_compare_counts_the_real_adapter(tiny_llama, method, rank):
    """compare's trainable_count (used by --budget params) equals the built adapter's count."""
    from adaptedit.compare import trainable_count
    from adaptedit.init import parameter_counts, plan

    source = resolve(str(tiny_llama))
    opts = InitOptions(method=method, rank=rank, targets="all-linear")
    targets, _ = plan(source, opts)
    built = parameter_counts(source, build(source, opts))[0]
    assert trainable_count(targets, InitOptions(method=method, rank=rank or 4)) == built
