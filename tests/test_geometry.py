"""Geometry metrics against planted answers and dense float64 references."""

import math

import pytest
import torch

from adaptedit import geometry
from adaptedit.analysis import analyze_module


def _orth(n, k, gen):
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q


def _planted_w0(out=48, inn=40, seed=0):
    """W₀ = U diag(s) Vᵀ with a well separated spectrum, returned with its exact SVD."""
    g = torch.Generator().manual_seed(seed)
    m = min(out, inn)
    u, v = _orth(out, m, g), _orth(inn, m, g)
    s = torch.logspace(1, -1, m, dtype=torch.float64)
    w0 = (u * s) @ v.T
    svd0 = {"u": u.float(), "s": s.float(), "vh": v.T.float(), "complete": True,
            "kind": "full", "accuracy": None, "cached": False}
    return w0.float(), svd0, u, s, v


def _exact_svd0(w0):
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    return {"u": u.float(), "s": s.float(), "vh": vh.float(), "complete": True, "kind": "full",
            "accuracy": None, "cached": False}


def _reference(w0, d, k):
    """Dense float64 reference of the subspace energies, ΔM and ΔD."""
    w0, d = w0.double(), d.double()
    u0, _, vh0 = torch.linalg.svd(w0, full_matrices=False)
    m = min(w0.shape)
    tot = (d ** 2).sum()
    w1 = w0 + d
    n0, n1 = w0.norm(dim=1), w1.norm(dim=1)
    pt = torch.eye(w0.shape[0], dtype=torch.float64) - u0[:, :k] @ u0[:, :k].T
    qt = torch.eye(w0.shape[1], dtype=torch.float64) - vh0[:k].T @ vh0[:k]
    pb = torch.eye(w0.shape[0], dtype=torch.float64) - u0[:, m - k:] @ u0[:, m - k:].T
    qb = torch.eye(w0.shape[1], dtype=torch.float64) - vh0[m - k:].T @ vh0[m - k:]
    return {
        "e_top": float(1 - (pt @ d @ qt).pow(2).sum() / tot),
        "e_bottom": float(1 - (pb @ d @ qb).pow(2).sum() / tot),
        "e_top_out": float((u0[:, :k].T @ d).pow(2).sum() / tot),
        "e_top_in": float((d @ vh0[:k].T).pow(2).sum() / tot),
        "e_bottom_out": float((u0[:, m - k:].T @ d).pow(2).sum() / tot),
        "e_bottom_in": float((d @ vh0[m - k:].T).pow(2).sum() / tot),
        "delta_m": float((n1 - n0).abs().mean()),
        "delta_d": float((1 - (w0 * w1).sum(1) / (n0 * n1)).mean()),
        "fro": float(tot.sqrt()),
    }


def test_update_in_top_subspace_has_e_top_one():
    w0, svd0, u, s, v = _planted_w0()
    g = torch.Generator().manual_seed(1)
    k = 4
    m = torch.randn(k, k, generator=g, dtype=torch.float64)
    p, q = u[:, :k] @ m, v[:, :k].T  # ΔW = U₀ₖ M V₀ₖᵀ
    rec = analyze_module(w0, svd0, p=p, q=q, k=k)
    assert rec["e_top_out"] == pytest.approx(1, abs=1e-6)
    assert rec["e_top_in"] == pytest.approx(1, abs=1e-6)
    assert rec["e_top"] == pytest.approx(1, abs=1e-6)
    assert rec["e_bottom_out"] == pytest.approx(0, abs=1e-6)
    assert rec["e_bottom"] == pytest.approx(0, abs=1e-6)
    assert rec["angle_min"] == pytest.approx(0, abs=1e-3)
    assert rec["phi"] == pytest.approx(1, abs=1e-6)


def test_update_in_bottom_subspace_has_e_bottom_one():
    w0, svd0, u, s, v = _planted_w0()
    k = 3
    p, q = u[:, -k:] * 0.5, v[:, -k:].T
    rec = analyze_module(w0, svd0, p=p, q=q, k=k)
    assert rec["e_bottom_out"] == pytest.approx(1, abs=1e-6)
    assert rec["e_bottom_in"] == pytest.approx(1, abs=1e-6)
    assert rec["e_bottom"] == pytest.approx(1, abs=1e-6)
    assert rec["e_top_out"] == pytest.approx(0, abs=1e-6)
    assert rec["e_top"] == pytest.approx(0, abs=1e-6)
    assert rec["angle_min"] == pytest.approx(90, abs=1e-3)
    # ΔW lives where W₀ is weak: the amplification is large (σ of W₀ there ~ 0.1 vs 10 on top)
    assert rec["amplification"] > 3


def test_random_update_matches_dense_reference_both_paths():
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(36, 28, generator=g)
    p = torch.randn(36, 5, generator=g, dtype=torch.float64) * 0.1
    q = torch.randn(5, 28, generator=g, dtype=torch.float64)
    svd0 = _exact_svd0(w0)
    ref = _reference(w0, p @ q, 5)
    lowrank = analyze_module(w0, svd0, p=p, q=q, k=5)
    dense = analyze_module(w0, svd0, dense=p @ q, k=5)
    for key, val in ref.items():
        assert lowrank[key] == pytest.approx(val, rel=1e-5, abs=1e-7), key
        assert dense[key] == pytest.approx(val, rel=1e-5, abs=1e-7), key
    for key in ("phi", "amplification", "effective_rank", "stable_rank", "intruders"):
        assert lowrank[key] == pytest.approx(dense[key], rel=1e-5), key


def test_two_sided_energy_sees_both_sides():
    """ΔW = U₀ₖ X + Y V₀ₖᵀ (PiSSA's δA and δB terms): each side alone sees part, both see all."""
    w0, svd0, u, s, v = _planted_w0()
    g = torch.Generator().manual_seed(11)
    k = 4
    p = torch.cat([u[:, :k], torch.randn(48, k, generator=g, dtype=torch.float64)], 1)
    q = torch.cat([torch.randn(k, 40, generator=g, dtype=torch.float64), v[:, :k].T], 0)
    rec = analyze_module(w0, svd0, p=p, q=q, k=k)
    assert rec["e_top"] == pytest.approx(1, abs=1e-6)
    assert rec["e_top_out"] < 0.9 and rec["e_top_in"] < 0.9
    ref = _reference(w0, p @ q, k)
    assert rec["e_bottom"] == pytest.approx(ref["e_bottom"], abs=1e-6)


def test_row_scaling_changes_magnitude_only():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(20, 16, generator=g, dtype=torch.float64)
    w0 = w0 / w0.norm(dim=1, keepdim=True)  # unit rows: ΔM is the mean scaling change
    c = 1 + 0.3 * torch.rand(20, generator=g, dtype=torch.float64)
    dm, dd = geometry.magnitude_direction(w0, w0 * c[:, None])
    assert dd == pytest.approx(0, abs=1e-12)
    assert dm == pytest.approx(float((c - 1).mean()), rel=1e-12)
    # the same through the factors: ΔW = diag(c − 1) W₀
    dm2, dd2 = geometry.magnitude_direction_lowrank(w0, torch.diag(c - 1), w0)
    assert dm2 == pytest.approx(dm, rel=1e-10) and dd2 == pytest.approx(0, abs=1e-12)


def test_rotation_of_rows_changes_direction_only():
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(20, 16, generator=g, dtype=torch.float64)
    r = _orth(16, 16, g)
    w1 = w0 @ r.T  # every row rotated by R: norms kept
    dm, dd = geometry.magnitude_direction(w0, w1)
    assert dm == pytest.approx(0, abs=1e-12)
    cos = (w0 * w1).sum(1) / (w0.norm(dim=1) * w1.norm(dim=1))
    assert dd == pytest.approx(float((1 - cos).mean()), rel=1e-12)
    assert dd > 0.1


def test_planted_intruder_is_found_exactly_once():
    w0, svd0, u, s, v = _planted_w0(out=48, inn=40)
    # a unit direction spread evenly over W₀'s 40 left singular vectors (|cos| = 1/√40 with each)
    # plus the 8-dim complement, with a singular value above W₀'s largest
    g = torch.Generator().manual_seed(5)
    comp = torch.linalg.qr(torch.cat([u, torch.randn(48, 8, generator=g, dtype=torch.float64)],
                                     1)).Q[:, 40:]
    x = u.sum(1) + comp.sum(1)
    x = x / x.norm()
    y = torch.randn(40, generator=g, dtype=torch.float64)
    y = y / y.norm()
    p, q = 30 * x[:, None], y[None, :]
    rec = analyze_module(w0, svd0, p=p, q=q, k=1, intruder_k=10, eps=0.5)
    assert rec["intruders"] == 1
    assert sorted(rec["intruder_cos"])[0] < 0.5 < sorted(rec["intruder_cos"])[1]
    # dense float64 reference: W₁'s exact top-10 left singular vectors
    u1 = torch.linalg.svd(w0.double() + p @ q, full_matrices=False).U[:, :10]
    best = (u.T @ u1).abs().amax(0)
    assert int((best < 0.5).sum()) == 1
    assert rec["intruder_cos"] == pytest.approx(best.tolist(), abs=1e-6)


def test_small_update_has_no_intruders():
    w0, svd0, u, s, v = _planted_w0()
    g = torch.Generator().manual_seed(6)
    p = torch.randn(48, 4, generator=g, dtype=torch.float64) * 1e-3
    q = torch.randn(4, 40, generator=g, dtype=torch.float64)
    assert analyze_module(w0, svd0, p=p, q=q, k=4)["intruders"] == 0


def test_ranks_of_known_spectra():
    flat = torch.ones(7)
    assert geometry.effective_rank(flat) == pytest.approx(7)
    assert geometry.stable_rank(flat) == pytest.approx(7)
    assert geometry.energy_rank(flat, 0.9) == 7 and geometry.energy_rank(flat, 0.5) == 4
    one = torch.tensor([3.0, 0, 0, 0])
    assert geometry.effective_rank(one) == pytest.approx(1)
    assert geometry.stable_rank(one) == pytest.approx(1)
    assert geometry.energy_rank(one, 0.99) == 1
    s = torch.tensor([2.0, 1.0])
    p = torch.tensor([2 / 3, 1 / 3])
    assert geometry.effective_rank(s) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    assert geometry.stable_rank(s) == pytest.approx(5 / 4)
    assert geometry.energy_rank(torch.tensor([3.0, 1.0]), 0.9) == 1  # 9/10 of the energy in σ₁
    assert geometry.energy_rank(torch.tensor([3.0, 1.0]), 0.95) == 2
    assert geometry.effective_rank(torch.zeros(3)) == 0 and geometry.stable_rank(torch.zeros(3)) == 0


def test_factor_svd_equals_dense_svd():
    g = torch.Generator().manual_seed(7)
    p = torch.randn(50, 6, generator=g, dtype=torch.float64)
    q = torch.randn(6, 30, generator=g, dtype=torch.float64)
    u, s, vh = geometry.delta_svd(p, q)
    ud, sd, vhd = torch.linalg.svd(p @ q, full_matrices=False)
    assert torch.allclose(s, sd[:6], rtol=1e-10)
    assert torch.allclose((u * s) @ vh, p @ q, atol=1e-10)
    # same subspaces (singular vectors up to sign)
    assert torch.allclose((u.T @ ud[:, :6]).abs(), torch.eye(6, dtype=torch.float64), atol=1e-8)


def test_principal_angles_and_similarity():
    g = torch.Generator().manual_seed(8)
    basis = _orth(20, 6, g)
    a, b = basis[:, :3], basis[:, 3:]
    assert geometry.principal_angles(a, a).max() == pytest.approx(0, abs=1e-5)
    assert geometry.principal_angles(a, b).min() == pytest.approx(90, abs=1e-5)
    assert geometry.subspace_similarity(a, a) == pytest.approx(1)
    assert geometry.subspace_similarity(a, b) == pytest.approx(0, abs=1e-12)
    # one shared direction out of 3: φ = 1/3; the angles are 0, 90, 90
    c = torch.cat([a[:, :1], b[:, :2]], 1)
    assert geometry.subspace_similarity(a, c) == pytest.approx(1 / 3)
    assert geometry.principal_angles(a, c).tolist() == pytest.approx([0, 90, 90], abs=1e-4)


def test_amplification_matches_definition():
    g = torch.Generator().manual_seed(9)
    w0 = torch.randn(30, 20, generator=g, dtype=torch.float64)
    d = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g,
                                                                           dtype=torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    ref = float(d.norm() / (u[:, :3].T @ w0 @ vh[:3].T).norm())
    assert geometry.amplification(w0, u[:, :3], s[:3], vh[:3]) == pytest.approx(ref)


def test_top_left_singular_matches_exact():
    g = torch.Generator().manual_seed(10)
    w0 = torch.randn(60, 40, generator=g, dtype=torch.float64)
    p = torch.randn(60, 4, generator=g, dtype=torch.float64)
    q = torch.randn(4, 40, generator=g, dtype=torch.float64)
    u0 = torch.linalg.svd(w0, full_matrices=False).U
    u1, s1 = geometry.top_left_singular(w0, 5, torch.cat([u0[:, :13], p], 1), p=p, q=q, niter=6)
    ue, se, _ = torch.linalg.svd(w0 + p @ q, full_matrices=False)
    assert torch.allclose(s1, se[:5], rtol=1e-6)
    assert torch.allclose((u1.T @ ue[:, :5]).abs().diagonal(), torch.ones(5, dtype=torch.float64),
                          atol=1e-5)


def test_pearson():
    assert geometry.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1)
    assert geometry.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert geometry.pearson([1, 2], [1, 2]) is None
    assert geometry.pearson([1, 1, 1], [1, 2, 3]) is None
