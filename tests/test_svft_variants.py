"""SVFT banded and random (adaptedit.methods.svft, Lingam et al. 2024): the patterns of M (checked
by explicit loops), random positions fixed by the seed and stored, identity at init bit for bit
(fp32, bf16, GPT-2 Conv1D), ΔW against a float64 dense U M Vᵀ, forward = merged weights (1e-5),
a factored forward that never builds a dense M or ΔW, exact resume, inspect, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_merged, logits, run_cli, train_and_resume

from adaptedit.adapter import save_adapter
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build, parameter_counts
from adaptedit.layer import attach
from adaptedit.merge import MergeOptions, merge
from adaptedit.methods import svft
from adaptedit.models import resolve

BANDED = {"svft_pattern": "banded", "svft_off_diagonals": 2}
RANDOM = {"svft_pattern": "random", "svft_random_k": 3}
NAME = "model.layers.0.mlp.up_proj"


def _opts(options, rank=6, **kw):
    return InitOptions(method="svft", rank=rank, options=dict(options), **kw)


def _trained(ad, seed=0):
    g = torch.Generator().manual_seed(seed)
    for t in ad.tensors.values():
        t["svft_m"] = 0.05 * torch.randn(t["svft_m"].shape, generator=g)
    return ad


def _reference_m(t, r):
    """M from its entries by plain loops, float64."""
    m = torch.zeros(r, r, dtype=torch.float64)
    for v, i, j in zip(t["svft_m"].tolist(), t["svft_rows"].tolist(), t["svft_cols"].tolist()):
        m[int(i), int(j)] += v
    return m


def test_banded_pattern_and_count(tiny_llama):
    r, d = 6, 2
    ad = build(resolve(str(tiny_llama)), _opts(BANDED, rank=r))
    t = ad.tensors[NAME]
    pos = {(int(i), int(j)) for i, j in zip(t["svft_rows"], t["svft_cols"])}
    assert pos == {(i, j) for i in range(r) for j in range(r) if abs(i - j) <= d}
    assert len(pos) == t["svft_m"].numel() == r * (2 * d + 1) - d * (d + 1)
    assert torch.equal(t["svft_m"], torch.zeros(t["svft_m"].shape))
    assert ad.config.init["svft_pattern"] == "banded" and ad.config.init["svft_off_diagonals"] == 2
    n = parameter_counts(resolve(str(tiny_llama)), ad)[0]
    assert n == len(ad.names) * (r * 5 - 6)


def test_random_pattern_fixed_by_the_seed_and_stored(tiny_llama, tmp_path):
    src = resolve(str(tiny_llama))
    a = build(src, _opts(RANDOM, seed=1))
    b = build(src, _opts(RANDOM, seed=1))
    c = build(src, _opts(RANDOM, seed=2))
    rows, cols = a.tensors[NAME]["svft_rows"], a.tensors[NAME]["svft_cols"]
    for i in range(6):  # k = 3 distinct columns in every row
        mine = cols[rows == i]
        assert mine.numel() == 3 and len(set(mine.tolist())) == 3
        assert all(0 <= j < 6 for j in mine.tolist())
    assert all(torch.equal(a.tensors[n]["svft_cols"], b.tensors[n]["svft_cols"]) for n in a.names)
    assert any(not torch.equal(a.tensors[n]["svft_cols"], c.tensors[n]["svft_cols"])
               for n in a.names)
    assert len({tuple(a.tensors[n]["svft_cols"].tolist()) for n in a.names}) > 1  # per module
    save_adapter(a, tmp_path / "ad")
    back = load_adapter(tmp_path / "ad")
    assert torch.equal(back.tensors[NAME]["svft_cols"], cols)


@pytest.mark.parametrize("options", [BANDED, RANDOM], ids=["banded", "random"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_at_init_bit_exact(options, fixture, dtype, request):
    source = resolve(str(request.getfixturevalue(fixture)))
    model = source.load(dtype=dtype)
    ref = logits(model)
    attach(model, build(source, _opts(options, rank=4)))
    assert torch.equal(logits(model), ref)


@pytest.mark.parametrize("options", [BANDED, RANDOM], ids=["banded", "random"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_delta_against_float64_and_forward_equals_merged(options, fixture, request, tmp_path):
    src = resolve(str(request.getfixturevalue(fixture)))
    ad = _trained(build(src, _opts(options)))
    save_adapter(ad, tmp_path / "ad")
    ad = load_adapter(tmp_path / "ad")
    for name in ad.names[:4]:
        t = ad.tensors[name]
        ref = t["svft_U"].double() @ _reference_m(t, 6) @ t["svft_V"].double()
        assert (ad.delta_w(name).double() - ref).abs().max() <= 1e-6 * ref.abs().max()
    res = merge([ad], tmp_path / "m", opts=MergeOptions())
    assert res.verified and res.max_abs_logit_diff <= 1e-5
    ref = logits(attach(src.load(dtype=torch.float32), ad))
    assert (logits(load_merged(tmp_path / "m")) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("options", [BANDED, RANDOM], ids=["banded", "random"])
def test_factored_forward_builds_no_dense_matrix(options, tiny_llama, monkeypatch):
    """Training's forward and backward never call dense_m (the only place M is made dense) nor
    the method's dense ΔW; the gradient reaches every entry of M."""
    src = resolve(str(tiny_llama))
    model = attach(src.load(dtype=torch.float32), _trained(build(src, _opts(options))))

    def refuse(*a, **k):
        raise AssertionError("dense M or ΔW formed in training")

    monkeypatch.setattr(svft, "dense_m", refuse)
    monkeypatch.setattr(svft, "terms", refuse)
    out = model(input_ids=torch.tensor([[1, 5, 9, 20]]))
    out.logits.float().pow(2).mean().backward()
    layer = model.get_submodule(NAME)
    assert layer.params["svft_m"].grad is not None
    assert torch.count_nonzero(layer.params["svft_m"].grad) == layer.params["svft_m"].numel()


@pytest.mark.parametrize("options", [BANDED, RANDOM], ids=["banded", "random"])
def test_train_and_resume_exact(options, tiny_llama, tmp_path):
    s, a, b = train_and_resume(tiny_llama, tmp_path, _opts(options, rank=8))
    assert s["final_loss"] < s["first_loss"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    start = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    k = NAME + "."
    assert torch.count_nonzero(a[k + "svft_m"]) > 0
    for frozen in ("svft_U", "svft_rows", "svft_cols"):
        assert torch.equal(a[k + frozen], start[k + frozen])


def test_inspect_reports_diagonal_and_offdiagonal(tiny_llama, tmp_path):
    ad = _trained(build(resolve(str(tiny_llama)), _opts(BANDED)))
    save_adapter(ad, tmp_path / "ad")
    code, out, err = run_cli(["inspect", str(tmp_path / "ad"), "--json", "-q"])
    assert code == 0, err
    rec = next(r for r in json.loads(out)["modules"] if r["name"] == NAME)["method"]
    m = _reference_m(ad.tensors[NAME], 6)
    diag = torch.diagonal(m)
    assert rec["svft_top_index"] == int(diag.abs().argmax())
    assert rec["svft_dsigma_max_abs"] == pytest.approx(float(diag.abs().max()), rel=1e-6)
    off = (m - torch.diag(diag)).norm() / m.norm()
    assert rec["svft_offdiag_share"] == pytest.approx(float(off), rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--svft-off-diagonals", "2"], "--svft-off-diagonals applies to --svft-pattern banded"),
    (["--svft-pattern", "random", "--svft-random-k", "9"], "--svft-random-k 9 exceeds the rank 4"),
    (["--svft-pattern", "banded", "--svft-off-diagonals", "4"], "needs rank > 4"),
    (["--svft-pattern", "diagonal"], "--svft-pattern 'diagonal': use plain, banded or random"),
    (["--svft-pattern", "random", "--svft-random-k", "0"], "must be an integer ≥ 1"),
])
def test_refusals_in_one_line(tiny_llama, tmp_path, extra, message):
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "svft", "--rank", "4", *extra,
                            "-o", str(tmp_path / "ad"), "-q"])
    assert code != 0 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ad").exists()


def test_svft_option_refused_on_another_method(tiny_llama, tmp_path):
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "lora", "--svft-pattern", "banded",
                            "-o", str(tmp_path / "ad"), "-q"])
    assert code != 0 and "--svft-pattern applies to svft, not lora" in err
