"""init's captured energy (issue 10 item 4): measured on every module against a float64 reference,
and the randomized SVD redone where it misses the floor; modules that meet it stay bit-identical."""

import json

import pytest
import torch

import fixtures
from adaptedit.init import ENERGY_FLOOR, InitOptions, build
from adaptedit.models import resolve

from helpers import run_cli


def _slow_decay(m):  # σᵢ = (1 + i)^-0.1: no gap, the fixed 4-iteration sketch captures ~0.94
    return [(1 + i) ** -0.1 for i in range(m)]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("energy")
    return {"flat": fixtures.make_synthetic_llama(root / "flat", spectrum=_slow_decay),
            "gauss": fixtures.make_synthetic_llama(root / "gauss")}


def _pissa(base, **kw):
    return build(resolve(str(base)), InitOptions(method="pissa", rank=16, svd="randomized", **kw))


def _reference(base, adapter) -> dict:
    """Per module, in float64: Σ σᵢ(s·B₀A₀)² / Σ_{i≤r} σᵢ(W)², from full SVDs."""
    ckpt = resolve(str(base)).checkpoint
    out = {}
    for name, info in adapter.config.modules.items():
        t = adapter.tensors[name]
        got = torch.linalg.svdvals(info.scaling * t["lora_B0"].double() @ t["lora_A0"].double())
        exact = torch.linalg.svdvals(ckpt.get(info.key).double())[:info.rank]
        out[name] = float((got ** 2).sum() / (exact ** 2).sum())
    return out


def test_fixed_sketch_misses_the_floor_and_the_default_meets_it(bases):
    fixed = _pissa(bases["flat"], energy_floor=0.0)
    ref = _reference(bases["flat"], fixed)
    assert min(ref.values()) < ENERGY_FLOOR - 0.01  # the fixture does what it is for
    ad = _pissa(bases["flat"])
    ref = _reference(bases["flat"], ad)
    assert min(ref.values()) >= ENERGY_FLOOR - 1e-6
    init = ad.config.init
    assert set(init["energy_refined"]) == {n for n, v in _reference(bases["flat"], fixed).items()
                                           if v < ENERGY_FLOOR}
    # every module's figure is recorded, and the minimum is the reference's
    for name, info in ad.config.modules.items():
        assert info.captured_energy == pytest.approx(ref[name], rel=0, abs=2e-6)
    worst = min(ref, key=ref.get)
    assert init["captured_energy_min"] == pytest.approx(ref[worst], rel=0, abs=2e-6)
    assert init["captured_energy_worst_module"] == worst
    assert init["energy_floor"] == ENERGY_FLOOR


def test_modules_that_meet_the_floor_are_unchanged(bases):
    fixed = _pissa(bases["gauss"], energy_floor=0.0)
    ad = _pissa(bases["gauss"])
    refined = ad.config.init["energy_refined"]
    assert 0 < len(refined) < len(ad.names)  # a mix: some redone, some not
    for name in ad.names:
        same = all(torch.equal(v, fixed.tensors[name][k]) for k, v in ad.tensors[name].items())
        assert same == (name not in refined), name
    assert ad.config.init["captured_energy_min"] >= ENERGY_FLOOR
    assert min(_reference(bases["gauss"], fixed).values()) < ENERGY_FLOOR


def test_floor_zero_is_the_fixed_sketch_unmeasured(bases, tmp_path, monkeypatch):
    """--energy-floor 0 turns the guard off: the same factors as the guarded run where it kept the
    sketch, no energy measured or recorded, no Gram spectra computed or cached."""
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path / "cache"))
    fixed = _pissa(bases["gauss"], energy_floor=0.0)
    assert not list((tmp_path / "cache").rglob("*-gram.safetensors"))
    assert all(m.captured_energy is None for m in fixed.config.modules.values())
    assert not any(k.startswith(("captured_energy", "energy_")) for k in fixed.config.init)
    ad = _pissa(bases["gauss"])
    assert list((tmp_path / "cache").rglob("*-gram.safetensors"))  # the guarded run measures
    kept = [n for n in ad.names if n not in ad.config.init["energy_refined"]]
    assert kept and all(torch.equal(v, fixed.tensors[n][k]) for n in kept
                        for k, v in ad.tensors[n].items())
    code, out, err = run_cli(["init", str(bases["gauss"]), "--method", "pissa", "-r", "16", "--svd",
                              "randomized", "--energy-floor", "0", "-o", str(tmp_path / "ad"),
                              "--json", "-q"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["energy_floor"] == 0 and "captured_energy_min" not in rep


def test_cli_reports_min_and_worst_module(bases, tmp_path):
    code, out, err = run_cli(["init", str(bases["flat"]), "--method", "pissa", "-r", "16", "--svd",
                              "randomized", "-o", str(tmp_path / "ad"), "--json", "-q"])
    assert code == 0, err
    rep = json.loads(out)
    saved = json.loads((tmp_path / "ad" / "adaptedit.json").read_text())
    energies = {n: m["captured_energy"] for n, m in saved["modules"].items()}
    assert len(energies) == 7 and all(e is not None for e in energies.values())
    assert rep["captured_energy_min"] == min(energies.values()) >= ENERGY_FLOOR
    assert rep["captured_energy_worst_module"] == min(energies, key=energies.get)
    assert rep["energy_refined_modules"] == len(saved["init"]["energy_refined"]) > 0
    code, _, err = run_cli(["init", str(bases["flat"]), "--method", "pissa", "--energy-floor", "1.5",
                            "-o", str(tmp_path / "bad")])
    assert code == 2 and "--energy-floor 1.5: must be in [0, 1]" in err


def test_second_init_reads_the_cached_spectra_and_is_identical(bases, tmp_path, monkeypatch):
    """The exact top-r energy comes from each weight's float64 Gram spectrum, cached per weight: a
    second init of the same base (here another rank) computes none, and the adapter of a repeated
    init is the first one bit for bit (tensors and recorded energies)."""
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path / "cache"))  # empty: this test's own
    calls = []
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = _pissa(bases["flat"])
    n_modules = len(first.config.modules)
    assert len(calls) == n_modules  # one spectrum per weight
    second = _pissa(bases["flat"])
    other_rank = build(resolve(str(bases["flat"])),
                       InitOptions(method="pissa", rank=8, svd="randomized"))
    assert len(calls) == n_modules  # read back, not recomputed
    assert other_rank.config.init["captured_energy_min"] > 0
    for name, info in first.config.modules.items():
        assert second.config.modules[name].captured_energy == info.captured_energy
        for key, v in first.tensors[name].items():
            assert torch.equal(second.tensors[name][key], v)
    assert len(list((tmp_path / "cache" / "svd").glob("*-gram.safetensors"))) == n_modules
