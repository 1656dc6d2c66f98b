"""SVFT plain (adaptedit.methods.svft): U_r, V_r are W's singular vectors from PiSSA's SVD (shared
cache: no second SVD), identity at init bit for bit (fp32, bf16, GPT-2 Conv1D), the factored
forward equals the merged weights (1e-5), ΔW = U diag(m) Vᵀ against float64, export refused with
the reason, exact resume, inspect's ΔΣ figures."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import init_is_identity, logits, run_cli, train_and_resume

from adaptedit import linalg
from adaptedit.adapter import save_adapter
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build
from adaptedit.layer import attach
from adaptedit.merge import MergeOptions, merge
from adaptedit.models import resolve


def _trained(ad, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in ad.tensors.values():
        t["svft_m"] = 0.05 * torch.randn(t["svft_m"].shape, generator=g)
    return ad


def test_basis_is_ws_singular_vectors_from_the_shared_svd(tiny_llama, monkeypatch):
    src = resolve(str(tiny_llama))
    with linalg.shared_svd():
        pissa = build(src, InitOptions(method="pissa", rank=4, svd="full"))
        calls = []
        real = torch.linalg.svd
        monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real(*a, **k))
        ad = build(src, InitOptions(method="svft", rank=4))
    assert not calls  # every SVD came from the cache PiSSA filled
    name = "model.layers.0.mlp.up_proj"
    t, info = ad.tensors[name], ad.config.modules[name]
    w = src.checkpoint.get(info.key).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(t["svft_s"].double(), s[:4], rtol=1e-6)
    # same subspace up to sign: |Uᵀ U_ref| = I
    assert torch.allclose((t["svft_U"].double().T @ u[:, :4]).abs(), torch.eye(4, dtype=torch.float64), atol=1e-5)
    assert torch.equal(t["svft_m"], torch.zeros(4)) and ad.config.init["svd"] == "full"
    p = pissa.tensors[name]  # PiSSA's B₀ = U_r √(Σ_r/s): the very same U_r
    root = torch.sqrt(t["svft_s"] / pissa.config.modules[name].scaling)
    assert torch.allclose(p["lora_B0"], t["svft_U"] * root, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init_bit_exact(fixture, dtype, request):
    init_is_identity(request.getfixturevalue(fixture), dtype, method="svft", rank=4)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_forward_equals_merged_weights(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    src = resolve(str(folder))
    ad = _trained(build(src, InitOptions(method="svft", rank=8)))
    save_adapter(ad, tmp_path / "ad")
    ad = load_adapter(tmp_path / "ad")
    for name in ad.names[:4]:
        t = ad.tensors[name]
        ref = t["svft_U"].double() @ torch.diag(t["svft_m"].double()) @ t["svft_V"].double()
        assert (ad.delta_w(name).double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    res = merge([ad], tmp_path / "m", opts=MergeOptions())
    assert res.verified and res.max_abs_logit_diff <= 1e-5
    from helpers import load_merged

    ref = logits(attach(src.load(dtype=torch.float32), ad))
    assert (logits(load_merged(tmp_path / "m")) - ref).abs().max() <= 1e-5


def test_export_refused_with_the_reason(tiny_llama, tmp_path):
    save_adapter(_trained(build(resolve(str(tiny_llama)), InitOptions(method="svft", rank=4))),
                 tmp_path / "ad")
    code, _, err = run_cli(["export", str(tmp_path / "ad"), "--format", "peft",
                            "-o", str(tmp_path / "p"), "-q"])
    assert code != 0 and "PEFT has no SVFT adapter type" in err and "adaptedit merge" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()


def test_inspect_reports_dsigma(tiny_llama, tmp_path):
    ad = _trained(build(resolve(str(tiny_llama)), InitOptions(method="svft", rank=4)))
    save_adapter(ad, tmp_path / "ad")
    code, out, err = run_cli(["inspect", str(tmp_path / "ad"), "--json", "-q"])
    assert code == 0, err
    rec = next(r for r in json.loads(out)["modules"] if r["name"] == "model.layers.0.mlp.up_proj")
    m = ad.tensors["model.layers.0.mlp.up_proj"]["svft_m"].double()
    assert rec["method"]["svft_top_index"] == int(m.abs().argmax())
    assert rec["method"]["svft_dsigma_max_abs"] == float(m.abs().max())


def test_train_and_resume_exact(tiny_llama, tmp_path):
    s, a, b = train_and_resume(tiny_llama, tmp_path, InitOptions(method="svft", rank=8))
    assert s["final_loss"] < s["first_loss"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    start = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    k = "model.layers.0.mlp.up_proj."
    assert torch.count_nonzero(a[k + "svft_m"]) > 0 and torch.equal(a[k + "svft_U"], start[k + "svft_U"])
