"""TIES / DARE conventions against PEFT's own merge functions, and --combine on one adapter
(issue 10, items 2 and 3). Tolerance 1e-6 (float32, the same operations up to summation order)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import make_adapter, run_cli, tensors

from adaptedit.formats import load_adapter
from adaptedit.combine import combine, dare, generator, trim
from adaptedit.targets import to_w


def _deltas(n=3, shape=(37, 53), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("density", [0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.3, 0.5], [1.5, -0.4, 0.2]])
def test_ties_matches_peft(density, weights):
    from peft.utils import merge_utils

    warnings.filterwarnings("ignore")
    ds = _deltas()
    expect = merge_utils.ties([d.clone() for d in ds], torch.tensor(weights), density)
    got = combine(ds, weights, "ties", density, 0, "k")
    assert (got - expect).abs().max().item() < 1e-6


def test_trim_keeps_floor_density_n_like_peft():
    from peft.utils import merge_utils

    d = torch.randn(7, 11)  # 77 entries: ⌊0.3·77⌋ = 23 kept, ⌈·⌉ would be 24
    assert int((trim(d, 0.3) != 0).sum()) == 23
    assert torch.equal(trim(d, 0.3), merge_utils.magnitude_based_pruning(d, 0.3))


def test_opposite_entries_keep_the_positive_one_like_peft():
    from peft.utils import merge_utils

    d1, d2 = torch.tensor([[2.0, -1.0]]), torch.tensor([[-2.0, 1.0]])
    got = combine([d1, d2], [1.0, 1.0], "ties", 1.0, 0, "k")
    assert torch.equal(got, torch.tensor([[2.0, 1.0]]))
    assert torch.equal(got, merge_utils.disjoint_merge(
        torch.stack([d1, d2]), merge_utils.calculate_majority_sign_mask(torch.stack([d1, d2]))))


@pytest.mark.parametrize("how", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.3, 0.5]])
def test_dare_matches_peft_given_the_same_drop(how, weights):
    """PEFT draws its own Bernoulli mask; given our dropped-and-rescaled tensors, its sign election
    and merge (density 1: no further drop) must give our result."""
    from peft.utils import merge_utils

    warnings.filterwarnings("ignore")
    ds, density = _deltas(seed=1), 0.3
    dropped = [dare(d, density, generator(4, "k", i)) for i, d in enumerate(ds)]
    fn = merge_utils.dare_ties if how == "dare_ties" else merge_utils.dare_linear
    expect = fn(dropped, torch.tensor(weights), 1.0)
    got = combine(ds, weights, how, density, 4, "k")
    assert (got - expect).abs().max().item() < 1e-6
    kept = float((dropped[0] != 0).float().mean())
    assert 0.25 < kept < 0.35 and torch.allclose(dropped[0][dropped[0] != 0],
                                                 ds[0][dropped[0] != 0] / density)


def test_single_adapter_combine_is_applied(tiny_llama, tmp_path):
    ad = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    plain, base = tmp_path / "plain", tensors(tiny_llama)
    assert run_cli(["merge", str(ad), "-o", str(plain), "-q", "--no-verify"])[0] == 0
    code, _, err = run_cli(["merge", str(ad), "-o", str(tmp_path / "d"), "-q", "--combine",
                            "dare_linear", "--density", "0.1", "--seed", "3"])
    assert code == 0, err
    a, got, ref = load_adapter(ad), tensors(tmp_path / "d"), tensors(plain)
    for name, info in a.config.modules.items():
        w = to_w(base[info.key], info.kind).float()
        expect = w + combine([a.delta_w(name, w)], [1.0], "dare_linear", 0.1, 3, info.key)
        assert (got[info.key] - expect).abs().max().item() < 1e-6, name
        assert not torch.equal(got[info.key], ref[info.key])


def test_density_with_linear_is_refused(tiny_llama, tmp_path):
    ad = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    code, _, err = run_cli(["merge", str(ad), "-o", str(tmp_path / "o"), "-q", "--density", "0.5"])
    assert code == 2 and "--density" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("how", ["linear", "ties"])
def test_seed_without_dare_is_refused(tiny_llama, tmp_path, how):
    """linear and ties draw nothing: a --seed given there is refused, not silently ignored."""
    ad = make_adapter(tiny_llama, tmp_path / "a", seed=1)
    extra = ["--density", "0.5"] if how == "ties" else []
    code, _, err = run_cli(["merge", str(ad), "-o", str(tmp_path / "o"), "-q", "--combine", how,
                            *extra, "--seed", "3"])
    assert code == 2 and "--seed applies to --combine dare_linear or dare_ties" in err, err
    assert f"{how} draws nothing" in err and not (tmp_path / "o").exists()
