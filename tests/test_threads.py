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


def test_batched_helpers_equal_one_matrix_at_a_time_on_one_thread():
    """top_energy and extreme_svd split a batch over threads; each matrix's result is what one
    thread computes alone (the reference), bit for bit."""
    w = torch.randn(5, 40, 30, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref_e = torch.stack([linalg._top_energy(w[j:j + 1], 4)[0] for j in range(5)])
        ref = [torch.linalg.svd(w[j].double(), full_matrices=False) for j in range(5)]
        torch.set_num_threads(2)
        assert torch.equal(linalg.top_energy(w, 4), ref_e)
        u, s, vh = linalg.extreme_svd(w, 3, minor=False)
        for j in range(5):
            assert torch.equal(s[j], ref[j].S[:3]) and torch.equal(u[j], ref[j].U[:, :3])
            assert torch.equal(vh[j], ref[j].Vh[:3])
        # and the top energy is Σσ² of the top 4 (float64 reference)
        assert torch.allclose(ref_e, torch.stack([r.S[:4].square().sum() for r in ref]),
                              rtol=1e-12, atol=0)
    finally:
        torch.set_num_threads(before)
