"""linalg.one_thread_each: small LAPACK jobs one thread each, shared over torch's threads."""

from __future__ import annotations

import threading

import pytest
import torch

from adaptedit import linalg


def test_results_in_order_each_call_on_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def job(i):
            seen.append((torch.get_num_threads(), threading.get_ident()))
            return i * i

        assert linalg.one_thread_each(job, range(20)) == [i * i for i in range(20)]
        assert {n for n, _ in seen} == {1}  # torch's ops inside each call: one thread
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)


def test_first_error_propagates_and_threads_are_restored():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    ran = []
    try:
        def job(i):
            ran.append(i)
            if i == 1:
                raise ValueError("module 1 is damaged")
            return i

        with pytest.raises(ValueError, match="module 1 is damaged"):
            linalg.one_thread_each(job, range(500))
        assert torch.get_num_threads() == 2
        assert len(ran) < 500  # the calls not yet started were cancelled
    finally:
        torch.set_num_threads(before)


def test_batched_helpers_equal_one_matrix_at_a_time_on_one_thread(tmp_path, monkeypatch):
    """gram_spectra and extreme_svd split a batch over threads; each matrix's result is what one
    thread computes alone (the reference), bit for bit — and so is a cached spectrum."""
    from adaptedit import svd_cache

    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path))
    w = torch.randn(5, 40, 30, generator=torch.Generator().manual_seed(0))
    fps, kinds = [f"fp{j}" for j in range(5)], ["linear"] * 5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref_e = [linalg.gram_spectrum(w[j:j + 1])[0] for j in range(5)]
        ref = [torch.linalg.svd(w[j].double(), full_matrices=False) for j in range(5)]
        torch.set_num_threads(2)
        for _ in range(2):  # computed and stored, then read back
            got = svd_cache.gram_spectra(w, fps, kinds)
            assert all(torch.equal(a, b) for a, b in zip(got, ref_e))
        assert len(list((tmp_path / "svd").glob("*-gram.safetensors"))) == 5
        u, s, vh = linalg.extreme_svd(w, 3, minor=False)
        for j in range(5):
            assert torch.equal(s[j], ref[j].S[:3]) and torch.equal(u[j], ref[j].U[:, :3])
            assert torch.equal(vh[j], ref[j].Vh[:3])
        # the spectrum is σ² (float64 reference), and top_energy sums the top r
        for e, r in zip(ref_e, ref):
            assert torch.allclose(e.flip(0), r.S.square(), rtol=1e-12, atol=1e-12)
            assert torch.allclose(linalg.top_energy(e, 4), r.S[:4].square().sum(), rtol=1e-13)
    finally:
        torch.set_num_threads(before)


def test_a_damaged_or_foreign_spectrum_entry_is_recomputed(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from adaptedit import svd_cache

    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path))
    w = torch.randn(2, 20, 12, generator=torch.Generator().manual_seed(1))
    ref = [linalg.gram_spectrum(w[j:j + 1])[0] for j in range(2)]
    path0 = svd_cache.svd_cache_path("a", "linear", "gram")
    path0.parent.mkdir(parents=True)
    path0.write_bytes(b"not a safetensors file")
    save_file({"eigenvalues": torch.ones(7, dtype=torch.float64)},  # another shape's spectrum
              str(svd_cache.svd_cache_path("b", "linear", "gram")))
    got = svd_cache.gram_spectra(w, ["a", "b"], ["linear", "linear"])
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    again = svd_cache.gram_spectra(w, ["a", "b"], ["linear", "linear"])  # the replaced entries
    assert all(torch.equal(a, b) for a, b in zip(again, ref))
