"""Small, exact linear-algebra helpers shared by init, inspect and extract."""

from __future__ import annotations

import contextlib
import hashlib

import torch

_SHARED: dict | None = None  # (fingerprint, device, rank) -> top and bottom triplets, when active


def randomized_svd(w: torch.Tensor, rank: int, *, niter: int = 4, oversample: int = 8,
                   generator: torch.Generator | None = None):
    """Top-``rank`` SVD of a batch of matrices (…, m, n) by Halko et al. (2011), Alg. 4.4.

    A Gaussian sketch of ``rank + oversample`` columns, ``niter`` power iterations with QR
    re-orthonormalisation, then an exact SVD of the small projected matrix. Seeded through
    ``generator``; the work runs on ``w``'s device and dtype. Returns U (…, m, r), S (…, r), Vh (…, r, n).
    """
    m, n = w.shape[-2:]
    k = min(rank + oversample, m, n)
    omega = torch.randn(*w.shape[:-2], n, k, generator=generator, dtype=w.dtype, device="cpu")
    omega = omega.to(w.device)
    q = torch.linalg.qr(w @ omega).Q  # (…, m, k)
    wt = w.transpose(-1, -2)
    for _ in range(niter):
        q = torch.linalg.qr(wt @ q).Q  # (…, n, k)
        q = torch.linalg.qr(w @ q).Q  # (…, m, k)
    u_small, s, vh = torch.linalg.svd(q.transpose(-1, -2) @ w, full_matrices=False)
    u = q @ u_small
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def one_thread_each(fn, items) -> list:
    """``[fn(x) for x in items]``, each call on one thread, the calls shared out over as many worker
    threads as torch would use (torch releases the GIL inside its ops).

    For many small LAPACK-sized jobs (a few hundred to a few thousand wide): one such call gains
    little from several threads (a 1536 × 576 SVD: 1.6× on 2) and loses a lot when the cores are
    shared (a 576-wide ``eigvalsh`` with 2 threads on a busy 2-core machine: 0.1-1.6 s instead of
    25 ms), while independent calls scale with the cores. A side effect: each result is what one
    thread computes, whatever the number of cores. The first error stops the remaining calls.
    """
    items = list(items)
    threads = torch.get_num_threads()
    if min(threads, len(items)) <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    torch.set_num_threads(1)  # process-wide: each worker's ops run on its own thread
    pool = ThreadPoolExecutor(min(threads, len(items)))
    try:
        return [f.result() for f in [pool.submit(fn, x) for x in items]]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def gram_spectrum(w: torch.Tensor) -> torch.Tensor:
    """Every eigenvalue (ascending, float64) of the Gram matrix of the smaller side of each matrix
    of a batch (b, m, n): the squared singular values, the leading ones exact to ~1e-15 relative,
    3-5× cheaper than ``svdvals``. Σ of the last r is the exact top-r energy Σ_{i ≤ r} σᵢ²."""
    wd = w.double()
    gram = wd @ wd.transpose(-1, -2) if wd.shape[-2] <= wd.shape[-1] else wd.transpose(-1, -2) @ wd
    return torch.linalg.eigvalsh(gram)


def top_energy(spectrum: torch.Tensor, rank: int) -> torch.Tensor:
    """Σ_{i ≤ rank} σᵢ² from :func:`gram_spectrum`'s eigenvalues (…, n)."""
    return spectrum[..., -rank:].clamp_min(0).sum(-1)


def lowrank_svd(p: torch.Tensor, q: torch.Tensor):
    """Thin SVD of ΔW = P @ Q (P: m×k, Q: k×n) without forming ΔW: O((m+n)k²).

    ΔW = Qp Rp Rqᵀ Qqᵀ with P = Qp Rp and Qᵀ = Qq Rq; the SVD of the k×k core Rp Rqᵀ = Uc S Vcᵀ gives
    U = Qp Uc and Vᵀ = Vcᵀ Qqᵀ. Returns U (m×k), S (k), Vh (k×n), singular values descending.
    """
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.transpose(-1, -2))
    uc, s, vch = torch.linalg.svd(rp @ rq.transpose(-1, -2), full_matrices=False)
    return qp @ uc, s, vch @ qq.transpose(-1, -2)


def fingerprint(t: torch.Tensor) -> str:
    """A cheap identity of a weight tensor: shape, dtype and a hash of ~100 KB of its bytes.

    Small tensors are hashed whole; larger ones by their first and last 16 KiB and 64 evenly spaced
    1 KiB blocks. A fine-tune changes every weight, so two checkpoints of the same architecture differ
    here, while fingerprinting a 70B model's targets stays fast.
    """
    flat = t.detach().contiguous().view(-1).view(torch.uint8)
    n = flat.numel()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}|{str(t.dtype).removeprefix('torch.')}".encode())
    if n <= 1 << 17:
        h.update(flat.numpy().tobytes())
    else:
        step = n // 64
        blocks = flat[: step * 64].view(64, step)[:, :1024]  # one gather, not 64 slices
        h.update(flat[: 1 << 14].numpy().tobytes())
        h.update(flat[-(1 << 14):].numpy().tobytes())
        h.update(blocks.contiguous().numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def shared_svd():
    """Inside this block :func:`extreme_svd` computes each input's SVD once and hands the same
    tensors to every later caller (a comparison initialises N runs from one base: one SVD per
    weight batch, not N). Only the top and bottom ``rank`` triplets are kept, so the memory is
    O(r·(m+n)) per matrix. Outside the block nothing is kept."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield _SHARED
    finally:
        _SHARED = outer


def extreme_svd(w: torch.Tensor, rank: int, minor: bool):
    """The top (or, with ``minor``, bottom) ``rank`` singular triplets of a batch of matrices
    (…, m, n) from an exact float64 SVD: U (…, m, r), S (…, r), Vh (…, r, n), float64.

    Inside :func:`shared_svd` the result is memoised by the batch's fingerprint, device and rank;
    a hit returns the very tensors the first call computed (bit-identical to recomputing)."""
    key = None
    if _SHARED is not None:
        key = (fingerprint(w.detach().cpu()), str(w.device), int(rank))
        hit = _SHARED.get(key)
        if hit is not None:
            return hit[minor]
    if w.dim() == 3 and w.device.type == "cpu":  # one matrix per thread (:func:`one_thread_each`)
        parts = one_thread_each(lambda j: torch.linalg.svd(w[j].double(), full_matrices=False),
                                range(w.shape[0]))
        u, s, vh = (torch.stack(part) for part in zip(*parts))
    else:
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    top = (u[..., :, :rank], s[..., :rank], vh[..., :rank, :])
    bottom = (u[..., :, -rank:], s[..., -rank:], vh[..., -rank:, :])
    if key is not None:
        # clones: views would keep the full U and Vh alive
        _SHARED[key] = tuple(tuple(t.clone() for t in part) for part in (top, bottom))
        return _SHARED[key][minor]
    return bottom if minor else top
