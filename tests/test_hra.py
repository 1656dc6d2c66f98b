"""HRA: a chain of Householder reflections of the input space (adaptedit/methods/hra.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import init_is_identity, perturb, run_cli
from orthogonal import export_matches_peft, merge_matches_adapter

from adaptedit.errors import AdapteditError
from adaptedit.init import InitOptions, build
from adaptedit.analysis import inspect_adapters
from adaptedit.layer import attach, penalty
from adaptedit.methods import hra
from adaptedit.models import resolve


def _householder_product(u: torch.Tensor) -> torch.Tensor:
    """Π (I − 2uᵢuᵢᵀ/‖uᵢ‖²) densely in float64 (the reference)."""
    u = u.double()
    h = torch.eye(u.shape[0], dtype=torch.float64)
    for i in range(u.shape[1]):
        v = u[:, i:i + 1]
        h = h @ (torch.eye(u.shape[0], dtype=torch.float64) - 2 * v @ v.T / (v.T @ v))
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_init_is_the_base_bit_for_bit(tiny_llama, tiny_gpt2, dtype, dora):
    init_is_identity(tiny_llama, dtype, method="hra", dora=dora)
    init_is_identity(tiny_llama, dtype, method="hra", dora=dora, rank=16)
    init_is_identity(tiny_gpt2, dtype, method="hra", dora=dora)  # GPT-2's Conv1D


def test_init_pairs_equal_vectors(tiny_llama):
    ad = build(resolve(str(tiny_llama)), InitOptions(method="hra", rank=6, seed=3))
    for name, t in ad.tensors.items():
        u = t["hra_u"]
        assert u.shape == (ad.config.modules[name].shape[1], 6)
        assert torch.equal(u[:, 0::2], u[:, 1::2]) and torch.linalg.matrix_rank(u) == 3
        assert ad.is_identity(name)


def test_merged_and_forward_are_the_householder_product(tiny_llama):
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(method="hra", rank=4)), 1, 0.3)
    src = resolve(str(tiny_llama))
    model = attach(src.load(dtype=torch.float32), ad)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        info = ad.config.modules[name]
        w = src.checkpoint.get(info.key).double()
        h = _householder_product(ad.tensors[name]["hra_u"])
        assert (h.T @ h - torch.eye(h.shape[0], dtype=h.dtype)).abs().max() <= 1e-12
        assert (ad.merged(name, w.float()).double() - w @ h).abs().max() <= 1e-6
        layer = model.get_submodule(name)
        xi = x[:, :info.shape[1]]
        with torch.no_grad():
            y = layer(xi).double()
        assert (y - (xi.double() @ (w @ h).T)).abs().max() <= 1e-5  # no bias in the tiny llama


def test_odd_rank_and_options_refused(tiny_llama, tmp_path):
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "hra", "-r", "5", "-o",
                            str(tmp_path / "a")])
    assert code == 2 and "HRA's identity init pairs equal reflections, so the rank must be even" \
        in err, err
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "hra", "--block-size", "8", "-o",
                            str(tmp_path / "b")])
    assert code == 2 and "--block-size applies to oft, boft, not hra" in err, err
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "hra", "--hra-lambda", "-1", "-o",
                            str(tmp_path / "c")])
    assert code == 2 and "--hra-lambda -1: must be a number ≥ 0" in err, err
    code, out, err = run_cli(["init", str(tiny_llama), "-m", "hra", "--json", "-o",
                              str(tmp_path / "d")])
    assert code == 0, err
    cfg = json.loads((tmp_path / "d" / "adaptedit.json").read_text())
    assert cfg["rank"] == 8  # PEFT's default r
    ins = [m["shape"][1] for m in cfg["modules"].values()]
    assert json.loads(out)["trainable_parameters"] == 8 * sum(ins)  # r vectors of length in
    assert not any((tmp_path / x).exists() for x in "abc")


def test_export_gives_peft_logits(tiny_llama, tiny_gpt2, tmp_path):
    cfg = export_matches_peft(tiny_llama, tmp_path, method="hra", rank=4)
    assert cfg["peft_type"] == "HRA" and cfg["r"] == 4 and cfg["apply_GS"] is False
    from adaptedit.peft_io import export_peft

    ad = build(resolve(str(tiny_gpt2)), InitOptions(method="hra"))
    with pytest.raises(AdapteditError, match="PEFT's HRA does not wrap GPT-2's Conv1D"):
        export_peft(ad, tmp_path / "g")


def test_orthogonality_regulariser(tiny_llama, tmp_path):
    """λ‖I − ÛᵀÛ‖²_F summed over the modules, against a float64 computation; 0 when λ is unset."""
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(method="hra", rank=4,
                                                             options={"hra_lambda": 1e-3})), 1)
    model = attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad)
    expect = 0.0
    for t in ad.tensors.values():
        u = t["hra_u"].double()
        un = u / u.norm(dim=0)
        expect += 1e-3 * float(((torch.eye(4, dtype=torch.float64) - un.T @ un) ** 2).sum())
    got = penalty(model)
    assert got.requires_grad and abs(float(got.detach()) - expect) <= 1e-6 * expect
    plain = build(resolve(str(tiny_llama)), InitOptions(method="hra", rank=4))
    assert penalty(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), plain)) is None


def test_inspect_reports_rotation_angles(tiny_llama, tmp_path):
    """Two reflections whose unit vectors meet at angle φ make a rotation by 2φ in their plane."""
    ad = build(resolve(str(tiny_llama)), InitOptions(method="hra", rank=2))
    phi = 0.3
    for name, t in ad.tensors.items():
        n = ad.config.modules[name].shape[1]
        u = torch.zeros(n, 2)
        u[0, 0], u[0, 1], u[1, 1] = 1.0, torch.cos(torch.tensor(phi)), torch.sin(torch.tensor(phi))
        t["hra_u"] = u
    ad.save(tmp_path / "ad")
    rep = inspect_adapters([tmp_path / "ad"])
    for rec in rep["modules"]:
        m = rec["method"]
        assert abs(m["angle_max_deg"] - 2 * torch.rad2deg(torch.tensor(phi)).item()) <= 1e-4
        assert abs(m["reflection_orthogonality"] - 2 ** 0.5 * abs(torch.cos(
            torch.tensor(phi)).item())) <= 1e-6
        assert abs(m["r_minus_i"] - 2 * 2 ** 0.5 * abs(torch.sin(torch.tensor(phi)).item())) \
            <= 1e-5  # ‖R(2φ) − I‖_F of a plane rotation: 2√2·sin φ
        assert not rec["zero"] and rec["fro"] > 0


@pytest.mark.parametrize("dora", [False, True])
def test_merge_is_exact_and_verified(tiny_llama, tiny_gpt2, tmp_path, dora):
    merge_matches_adapter(tiny_llama, tmp_path / "l", method="hra", dora=dora, rank=4)
    merge_matches_adapter(tiny_gpt2, tmp_path / "g", method="hra", dora=dora, rank=4)


def test_identity_pairs_survive_the_exact_arithmetic():
    """H(u)H(u) x = x bit for bit, for random u and x of many scales (d = 4p − 2p − 2p = 0)."""
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 1.0, 1e3):
        u = torch.randn(48, generator=g) * scale
        x = torch.randn(7, 48, generator=g)
        assert torch.equal(hra.pair(x, u, u.clone()), x)


def test_training_keeps_only_the_input_of_the_reflection_chain():
    """In training the chain is checkpointed: autograd keeps x and U (not two activation-sized
    tensors per pair), and the values and gradients are those of the plain chain, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, 48, generator=gen, requires_grad=True)
    u = torch.randn(48, 8, generator=gen, requires_grad=True)

    def run(fn):
        kept = {}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: kept.setdefault(id(t), t.numel() * t.element_size()) and t, lambda t: t):
            y = fn(x, u)
        return y, sum(kept.values())

    plain, plain_bytes = run(hra.reflect)
    lean, lean_bytes = run(hra.reflect_lean)
    activation = x.numel() * x.element_size()
    assert plain_bytes >= 4 * activation  # r/2 = 4 pairs, each keeping at least its input
    assert lean_bytes <= activation + u.numel() * u.element_size()
    assert torch.equal(plain, lean)
    g = torch.randn(plain.shape, generator=gen)
    for a, b in zip(torch.autograd.grad(plain, (x, u), g), torch.autograd.grad(lean, (x, u), g)):
        assert torch.equal(a, b)
    with torch.no_grad():  # evaluation and merge-time forwards take the plain path
        assert torch.equal(hra.reflect_lean(x, u), plain)
