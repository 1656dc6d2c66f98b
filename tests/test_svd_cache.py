"""inspect's W₀ SVD cache (adaptedit.svd_cache): only the two ends of the singular vectors stored,
figures identical to the complete SVD, intruder cosines exact, the cache folder capped."""

import json
import os

import pytest
import torch

import fixtures
from adaptedit import svd_cache
from adaptedit.errors import AdapteditError
from adaptedit.init import InitOptions, build
from adaptedit.analysis import inspect_adapters
from adaptedit.models import resolve

from helpers import perturb


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A Llama checkpoint with 256 × 256 and 512 × 256 weights (min(out, in) > 2 · KEEP) and an
    adapter on it: a trained-like PiSSA update, rank 8."""
    root = tmp_path_factory.mktemp("wide")
    base = fixtures.make_synthetic_llama(root / "base", layers=1)
    ad = build(resolve(str(base)), InitOptions(method="pissa", rank=8, svd="full"))
    perturb(ad, seed=1, scale=0.02)
    ad.save(root / "ad")
    return base, root / "ad"


def _report(folder, tmp_path, monkeypatch, name):
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path / name))
    rep = inspect_adapters([folder])
    rep.pop("seconds")
    return rep


def test_ends_only_cache_gives_the_same_report(wide, tmp_path, monkeypatch):
    _, ad = wide
    cold = _report(ad, tmp_path, monkeypatch, "ends")
    warm = _report(ad, tmp_path, monkeypatch, "ends")
    files = sorted((tmp_path / "ends" / "svd").glob("*.safetensors"))
    assert any("-ends64" in f.name for f in files) and any("-full" in f.name for f in files)
    monkeypatch.setattr(svd_cache, "KEEP", 10_000)  # every entry complete: the former layout
    complete_cold = _report(ad, tmp_path, monkeypatch, "complete")
    complete_warm = _report(ad, tmp_path, monkeypatch, "complete")
    assert not any("-ends" in f.name for f in (tmp_path / "complete" / "svd").iterdir())
    assert cold["svd_cache"] == {"hits": 0, "computed": 7} and warm["svd_cache"]["hits"] == 7
    # bit-identical figures (JSON text) whether the bottom vectors come from the complete SVD or
    # from the stored end. (Cold and warm runs differ in the last bits, as before: LAPACK returns
    # U in column-major order, the cache gives it back row-major, and BLAS sums in another order.)
    for ends_rep, full_rep in ((cold, complete_cold), (warm, complete_warm)):
        ends_rep.pop("svd_cache"), full_rep.pop("svd_cache")
        assert json.dumps(ends_rep, sort_keys=True) == json.dumps(full_rep, sort_keys=True)
    ends = sum(f.stat().st_size for f in files)
    full = sum(f.stat().st_size for f in (tmp_path / "complete" / "svd").iterdir())
    assert ends < 0.6 * full


def test_stored_ends_are_the_exact_svd(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path))
    w = torch.randn(300, 260, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w = w.float()
    rec = svd_cache.base_svd(w, "linear", w, need=16)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    assert rec["u"].shape == (300, 64) and rec["u_bottom"].shape == (300, 64)
    assert torch.equal(rec["s"], s) and torch.equal(rec["u"], u[:, :64])
    assert torch.equal(rec["u_bottom"], u[:, -64:]) and torch.equal(rec["vh_bottom"], vh[-64:])
    again = svd_cache.base_svd(w, "linear", w, need=16)
    assert again["cached"] and torch.equal(again["u_bottom"], rec["u_bottom"])
    # a larger k than the entry holds is a miss, recomputed with more vectors
    more = svd_cache.base_svd(w, "linear", w, need=100)
    assert not more["cached"] and more["u"].shape == (300, 108)


def test_best_cos_against_every_singular_vector(tmp_path):
    """Against a float64 reference over all of W₀'s left singular vectors, for vectors whose best
    match is at the top, at the bottom, and in the unstored middle (the bound cannot decide there:
    the SVD is recomputed)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(320, 300, generator=g).float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    svd0 = {"u": u[:, :72], "vh": vh[:72], "s": s, "u_bottom": u[:, -72:], "vh_bottom": vh[-72:]}
    noise = 0.01 * torch.randn(320, 3, generator=g, dtype=torch.float64)
    x = torch.stack([u[:, 3].double(), u[:, 290].double(), u[:, 150].double()], 1) + noise
    x = x / x.norm(dim=0)
    ref = (u.double().T @ x).abs().amax(0)
    got = svd_cache.best_cos(svd0, x, w)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)
    assert float(got[2]) > 0.9  # found in the middle, which the entry does not store


def test_cache_is_capped(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path))
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(64, 48, generator=g) for _ in range(6)]
    entry = (64 * 48 + 48 + 48 * 48) * 4  # complete u, s, vh in float32 (+ a small header)
    monkeypatch.setenv(svd_cache.CACHE_MAX_ENV, str(3 * entry + 2000))
    for w in ws:
        svd_cache.base_svd(w, "linear", w, need=4)
    files = list((tmp_path / "svd").glob("*.safetensors"))
    assert len(files) == 3  # the three most recent
    assert sum(f.stat().st_size for f in files) <= 3 * entry + 2000
    assert svd_cache.base_svd(ws[-1], "linear", ws[-1], need=4)["cached"]
    assert not svd_cache.base_svd(ws[0], "linear", ws[0], need=4)["cached"]  # evicted
    monkeypatch.setenv(svd_cache.CACHE_MAX_ENV, "0")
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path / "none"))
    svd_cache.base_svd(ws[0], "linear", ws[0], need=4)
    assert not (tmp_path / "none" / "svd").exists() or not any((tmp_path / "none" / "svd").iterdir())


@pytest.mark.parametrize("text,size", [("500MB", 500 * 10**6), ("2GiB", 2 << 30), ("0", 0),
                                        ("1.5GB", 15 * 10**8), ("", svd_cache.CACHE_MAX_DEFAULT)])
def test_cache_max_parsing(text, size, monkeypatch):
    monkeypatch.setenv(svd_cache.CACHE_MAX_ENV, text)
    assert svd_cache.cache_max() == size


def test_cache_max_refuses_nonsense(monkeypatch):
    monkeypatch.setenv(svd_cache.CACHE_MAX_ENV, "lots")
    with pytest.raises(AdapteditError, match="ADAPTEDIT_SVD_CACHE_MAX='lots': not a size"):
        svd_cache.cache_max()


def test_dead_writers_files_are_removed_once_per_process(tmp_path, monkeypatch):
    """A killed writer's temporary entry is removed at this process's first write into the folder;
    later writes do not list the folder again (it cost ~3 ms per write at 400 entries)."""
    import subprocess
    import sys

    from adaptedit import leftovers

    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path))
    monkeypatch.setattr(svd_cache, "_CLEANED", set())
    folder = tmp_path / "svd"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = folder / f".x-linear-full.safetensors.tmp-{proc.pid}-{leftovers._host()}-abc"
    dead.write_bytes(b"\0" * 100)
    live = folder / f".y-linear-full.safetensors.tmp-{os.getppid()}-{leftovers._host()}-abc"
    live.write_bytes(b"\0" * 100)
    calls = []
    real = leftovers.clean
    monkeypatch.setattr(leftovers, "clean", lambda *a, **k: calls.append(a) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        w = torch.randn(12, 8, generator=g)
        assert not svd_cache.base_svd(w, "linear", w, need=2)["cached"]
    assert not dead.exists() and live.exists()  # a running writer's file is left alone
    assert calls == [(folder,)]
    assert len(list(folder.glob("*.safetensors"))) == 3
