"""SSVD (adaptedit.methods.ssvd): W' = U_k (Σ_k + ΔΣ) G V_kᵀ + W_res with G = (I − S)(I + S)⁻¹.
The basis is W's top-k triplets from the shared SVD (no second SVD), identity at init bit for bit
(fp32, bf16, GPT-2 Conv1D), ΔW against a float64 evaluation of the equation itself (W_res and G
formed explicitly), forward = merged weights (1e-5), merge verified, export refused with the
reason, train + exact resume, inspect's figures."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_merged, logits, run_cli, train_and_resume

from adaptedit import linalg
from adaptedit.adapter import save_adapter
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build, parameter_counts
from adaptedit.layer import attach
from adaptedit.merge import MergeOptions, merge
from adaptedit.models import resolve
from adaptedit.targets import to_w

NAME = "model.layers.0.mlp.up_proj"


def _trained(ad, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    for t in ad.tensors.values():
        for k in ("ssvd_dsigma", "ssvd_S"):
            t[k] = scale * torch.randn(t[k].shape, generator=g)
    return ad


def _reference(w, t, k):
    """W' − W by the paper's equation in float64: U(Σ + ΔΣ)G Vᵀ + (W − UΣVᵀ) − W."""
    u, s, v = t["ssvd_U"].double(), t["ssvd_s"].double(), t["ssvd_V"].double()
    skew = torch.zeros(k, k, dtype=torch.float64)
    rows, cols = torch.triu_indices(k, k, 1)
    skew[rows, cols] = t["ssvd_S"].double()
    skew = skew - skew.T
    eye = torch.eye(k, dtype=torch.float64)
    g = (eye - skew) @ torch.linalg.inv(eye + skew)
    w = w.double()
    w_res = w - u @ torch.diag(s) @ v
    return u @ torch.diag(s + t["ssvd_dsigma"].double()) @ g @ v + w_res - w, g


def test_basis_is_ws_top_triplets_from_the_shared_svd(tiny_llama, monkeypatch):
    src = resolve(str(tiny_llama))
    with linalg.shared_svd():
        build(src, InitOptions(method="svft", rank=4))
        calls = []
        real = torch.linalg.svd
        monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real(*a, **k))
        ad = build(src, InitOptions(method="ssvd", rank=4))
    assert not calls  # every SVD came from the cache SVFT filled: one SVD implementation
    t, info = ad.tensors[NAME], ad.config.modules[NAME]
    w = src.checkpoint.get(info.key).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert torch.allclose(t["ssvd_s"].double(), s[:4], rtol=1e-6)
    assert torch.allclose((t["ssvd_V"].double() @ vh[:4].T).abs(), torch.eye(4, dtype=torch.float64),
                          atol=1e-5)
    assert torch.equal(t["ssvd_dsigma"], torch.zeros(4)) and torch.equal(t["ssvd_S"], torch.zeros(6))
    assert parameter_counts(src, ad)[0] == len(ad.names) * (4 + 6)  # k + k(k − 1)/2


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init_bit_exact(fixture, dtype, request, tmp_path):
    source = resolve(str(request.getfixturevalue(fixture)))
    model = source.load(dtype=dtype)
    ref = logits(model)
    ad = build(source, InitOptions(method="ssvd", rank=4))
    attach(model, ad)
    assert torch.equal(logits(model), ref)
    # and merge writes W itself: ΔW = 0 exactly, not W − UΣVᵀ + UΣVᵀ
    for name in ad.names[:3]:
        info = ad.config.modules[name]
        w = to_w(source.checkpoint.get(info.key), info.kind).float()
        assert torch.equal(ad.merged(name, w), w)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_delta_against_the_float64_equation_and_merge(fixture, request, tmp_path):
    src = resolve(str(request.getfixturevalue(fixture)))
    ad = _trained(build(src, InitOptions(method="ssvd", rank=6)))
    save_adapter(ad, tmp_path / "ad")
    ad = load_adapter(tmp_path / "ad")
    for name in ad.names[:4]:
        info = ad.config.modules[name]
        w = to_w(src.checkpoint.get(info.key), info.kind).float()
        ref, g = _reference(w, ad.tensors[name], 6)
        assert torch.allclose(g.T @ g, torch.eye(6, dtype=torch.float64), atol=1e-12)  # G orthogonal
        assert (ad.delta_w(name, w).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    res = merge([ad], tmp_path / "m", opts=MergeOptions())
    assert res.verified and res.max_abs_logit_diff <= 1e-5
    ref = logits(attach(src.load(dtype=torch.float32), ad))
    assert (logits(load_merged(tmp_path / "m")) - ref).abs().max() <= 1e-5


def test_export_refused_with_the_reason(tiny_llama, tmp_path):
    save_adapter(_trained(build(resolve(str(tiny_llama)), InitOptions(method="ssvd", rank=4))),
                 tmp_path / "ad")
    code, _, err = run_cli(["export", str(tmp_path / "ad"), "--format", "peft",
                            "-o", str(tmp_path / "p"), "-q"])
    assert code != 0 and "PEFT has no SSVD adapter type" in err and "adaptedit merge" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_train_and_resume_exact(tiny_llama, tmp_path):
    s, a, b = train_and_resume(tiny_llama, tmp_path, InitOptions(method="ssvd", rank=8))
    assert s["final_loss"] < s["first_loss"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    start = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    k = NAME + "."
    assert torch.count_nonzero(a[k + "ssvd_dsigma"]) > 0 and torch.count_nonzero(a[k + "ssvd_S"]) > 0
    for frozen in ("ssvd_U", "ssvd_V", "ssvd_s"):
        assert torch.equal(a[k + frozen], start[k + frozen])


def test_inspect_reports_scale_and_rotation(tiny_llama, tmp_path):
    ad = _trained(build(resolve(str(tiny_llama)), InitOptions(method="ssvd", rank=4)))
    save_adapter(ad, tmp_path / "ad")
    code, out, err = run_cli(["inspect", str(tmp_path / "ad"), "--json", "-q"])
    assert code == 0, err
    rec = next(r for r in json.loads(out)["modules"] if r["name"] == NAME)["method"]
    t = ad.tensors[NAME]
    d = t["ssvd_dsigma"].double()
    assert rec["ssvd_top_index"] == int(d.abs().argmax())
    assert rec["ssvd_dsigma_max_abs"] == pytest.approx(float(d.abs().max()), rel=1e-9)
    _, g = _reference(torch.zeros(t["ssvd_U"].shape[0], t["ssvd_V"].shape[1]), t, 4)
    assert rec["ssvd_g_minus_i"] == pytest.approx(float((g - torch.eye(4, dtype=torch.float64)).norm()),
                                                   rel=1e-5)
