"""W₀'s SVD for ``adaptedit inspect`` and its Gram spectrum for ``adaptedit init``, computed once
per base weight and cached on disk.

The metrics use W₀'s singular values, its top-k and bottom-k singular subspaces (both sides), the
leading ``intruder-k + 8`` left vectors (to start the intruder iteration) and, for the intruder test,
the best |cos| of a vector with *every* left singular vector. So an exact entry stores all singular
values and only the top ``K`` and bottom ``K`` singular vectors, K = max(``KEEP``, need + 8): for a
576 × 1536 weight 0.24 MB instead of 1.7 MB. Where 2K ≥ min(out, in) the entry is complete. For the
intruder test the columns in between are bounded (:func:`best_cos`) and, in the rare case the bound
cannot decide, recomputed.

init's exact captured energy needs every module's float64 Gram eigenvalues (≈ 40 ms of one core for
a 1536 × 576 weight, half of a SmolLM2 init); a rank sweep or a comparison initialises the same base
many times, so they are cached too (``gram`` entries, min(out, in) floats each: 1 MB for SmolLM2).

Entries live in ``cache_dir()/svd/<fingerprint>-<kind>-<tag>.safetensors`` and the folder is capped
at ``ADAPTEDIT_SVD_CACHE_MAX`` (default 2GB; ``0`` writes nothing): when a write may take the
folder past the cap, the least recently used entries go until it fits.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch

from adaptedit import leftovers
from adaptedit.errors import AdapteditError

EXACT_MAX = 2048  # min(out, in) up to which W₀'s SVD is exact (all singular values, both ends)
KEEP = 64  # singular vectors kept at each end of an exact entry (at least; more when k needs it)
CACHE_MAX_ENV = "ADAPTEDIT_SVD_CACHE_MAX"
CACHE_MAX_DEFAULT = 2 << 30
_SCANNED: dict = {}  # (folder, cap) -> bytes found at the last scan + what this process wrote since
_CLEANED: set = set()  # folders whose dead writers' temporary files this process has removed
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


def cache_max() -> int:
    """The cap in bytes from $ADAPTEDIT_SVD_CACHE_MAX (e.g. 500MB, 2GB, 0), else 2 GiB."""
    text = os.environ.get(CACHE_MAX_ENV, "").strip()
    if not text:
        return CACHE_MAX_DEFAULT
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise AdapteditError(f"{CACHE_MAX_ENV}={text!r}: not a size; use e.g. 500MB, 2GB or 0 "
                             "(no SVD cache)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def svd_cache_path(fp: str, kind: str, tag: str) -> Path:
    from adaptedit.models import cache_dir

    return cache_dir() / "svd" / f"{fp}-{kind}-{tag}.safetensors"


def base_svd(raw: torch.Tensor, kind: str, w: torch.Tensor, *, mode: str = "auto", need: int = 16,
             seed: int = 0, cache: bool = True) -> dict:
    """W₀'s SVD for one base weight (``raw`` as stored, ``w`` = W₀ out × in, float32).

    Returns {"u", "vh": the leading K vectors (float32), "u_bottom", "vh_bottom": the last K (None
    when "u" is complete or the SVD randomized), "s": every singular value of an exact SVD (the
    leading ones of a randomized one), "complete": exact, "kind": "full"|"randomized",
    "accuracy": {...} or None, "cached": bool}. ``need`` is the largest k the caller uses.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from adaptedit.linalg import fingerprint, randomized_svd

    m = min(w.shape)
    full = mode == "full" or (mode == "auto" and m <= EXACT_MAX)
    keep = max(KEEP, need + 8)
    if full:
        tag = "full" if 2 * keep >= m else f"ends{keep}"
    else:
        rank = min(m, max(need, 64))
        tag = f"rand{rank}-s{seed}"
    path = svd_cache_path(fingerprint(raw), kind, tag)
    if cache and path.exists():
        try:
            t = load_file(str(path))
            if _fits(t, w.shape, m, keep if full else rank, full):
                _touch(path)
                return _svd_record(t, full, cached=True)
        except (SafetensorError, OSError, KeyError, Exception):
            pass  # a damaged cache entry is recomputed and replaced
    if full:
        u, s, vh = exact_svd(w)
        t = {"u": u.float(), "s": s.float(), "vh": vh.float()}
        if 2 * keep < m:  # the two ends only
            t = {"u": t["u"][:, :keep], "vh": t["vh"][:keep], "s": t["s"],
                 "u_bottom": t["u"][:, m - keep:], "vh_bottom": t["vh"][m - keep:]}
    else:
        gen = torch.Generator().manual_seed(seed)
        u, s, vh = randomized_svd(w.double(), rank, niter=4, oversample=8, generator=gen)
        resid = torch.linalg.vector_norm(w.double().T @ u - vh.T * s, dim=0) / s.clamp_min(1e-300)
        total = float(w.double().pow(2).sum())
        t = {"u": u.float(), "s": s.float(), "vh": vh.float(),
             "captured": torch.tensor([float((s ** 2).sum()) / total if total > 0 else 1.0]),
             "residual": torch.tensor([float(resid.max())])}
    if cache:
        _store(path, t)
    return _svd_record(t, full, cached=False)


def gram_spectra(w: torch.Tensor, fps: list, kinds: list) -> list:
    """:func:`adaptedit.linalg.gram_spectrum` of each matrix of a batch (b, m, n) (CPU float64
    tensors), read from the cache where an entry of that weight (fingerprint ``fps[j]``, layout
    ``kinds[j]``) exists and computed (one matrix per thread) and stored where not. A cached
    spectrum is the computed one, bit for bit."""
    from safetensors.torch import load_file

    from adaptedit.linalg import gram_spectrum, one_thread_each

    n = min(w.shape[-2:])
    out, todo = [None] * len(fps), []
    for j, (fp, kind) in enumerate(zip(fps, kinds)):
        path = svd_cache_path(fp, kind, "gram")
        try:
            e = load_file(str(path))["eigenvalues"] if path.exists() else None
        except Exception:  # a damaged entry is recomputed and replaced
            e = None
        if e is not None and e.dtype == torch.float64 and e.shape == (n,) and bool(
                torch.isfinite(e).all()):
            out[j] = e
            _touch(path)
        else:
            todo.append(j)
    if w.device.type == "cpu":
        found = one_thread_each(lambda j: gram_spectrum(w[j:j + 1])[0], todo)
    else:
        found = [gram_spectrum(w[j:j + 1])[0].cpu() for j in todo]
    for j, e in zip(todo, found):
        out[j] = e
        _store(svd_cache_path(fps[j], kinds[j], "gram"), {"eigenvalues": e})
    return out


def exact_svd(w: torch.Tensor):
    """LAPACK's SVD of W₀: float32 beyond min(out, in) = 256 (backward stable, ~1.6× faster than
    float64 here), float64 below, where it costs nothing."""
    return torch.linalg.svd(w.double() if min(w.shape) <= 256 else w.float(), full_matrices=False)


def _fits(t: dict, shape, m: int, keep: int, full: bool) -> bool:
    out_f, in_f = shape
    cols = m if full and 2 * keep >= m else keep
    ok = t["u"].shape == (out_f, cols) and t["vh"].shape == (cols, in_f)
    if full:
        ok = ok and t["s"].shape == (m,)
        if cols < m:
            ok = ok and t["u_bottom"].shape == (out_f, keep) and t["vh_bottom"].shape == (keep, in_f)
    return ok


def _svd_record(t: dict, full: bool, cached: bool) -> dict:
    acc = None
    if not full:
        acc = {"captured_energy": float(t["captured"][0]), "max_residual": float(t["residual"][0])}
    return {"u": t["u"], "s": t["s"], "vh": t["vh"], "u_bottom": t.get("u_bottom"),
            "vh_bottom": t.get("vh_bottom"), "complete": full,
            "kind": "full" if full else "randomized", "accuracy": acc, "cached": cached}


def _touch(path: Path) -> None:
    try:
        os.utime(path)  # least recently *used* goes first
    except OSError:
        pass


def _store(path: Path, t: dict) -> None:
    from safetensors.torch import save_file

    limit = cache_max()
    size = sum(v.numel() * v.element_size() for v in t.values())
    if limit <= 0 or size > limit:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent not in _CLEANED:  # dead writers' temporary files, once per process:
            leftovers.clean(path.parent)    # listing the folder per write cost ~3 ms at 400 entries
            _CLEANED.add(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=leftovers.tmp_prefix(path.name), dir=path.parent)
        os.close(fd)
    except OSError:
        return  # a read-only cache only costs time
    try:
        save_file({k: v.contiguous() for k, v in t.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
        written = path.stat().st_size
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return
    # Scanning the folder costs ~2 ms per write at 200 entries: scan on this process's first write
    # and whenever its writes since the last scan could take the folder past the cap.
    key = (path.parent, limit)
    known = _SCANNED.get(key)
    if known is not None and known + written <= limit:
        _SCANNED[key] = known + written
    else:
        _SCANNED[key] = trim(path.parent, limit, keep=path)


def trim(folder: Path, limit: int, keep: Path | None = None) -> int:
    """Remove the least recently used entries of ``folder`` until it holds ≤ ``limit`` bytes.
    Returns the bytes left."""
    entries = []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_file() and e.name.endswith(".safetensors") and not e.name.startswith("."):
                st = e.stat()
                entries.append((st.st_mtime, st.st_size, Path(e.path)))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries):
        if total <= limit:
            break
        if keep is not None and p == keep:
            continue
        try:
            p.unlink()
            total -= size
        except OSError:
            pass
    return total


def best_cos(svd0: dict, u1: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """For each column of ``u1`` (unit vectors), the largest |cos| with a left singular vector of W₀.

    With an entry holding only the two ends, the columns in between are bounded: their squared
    cosines sum to at most 1 − Σ (the stored ones)², so when the best stored |cos| is above the
    square root of that rest it is the answer. Otherwise the full SVD is recomputed (not cached).
    Identical to comparing with every column when the entry is complete.
    """
    u1 = u1.double()
    if svd0.get("u_bottom") is None:
        return (svd0["u"].double().T @ u1).abs().amax(0)
    stored = torch.cat([svd0["u"], svd0["u_bottom"]], dim=1).double()
    c = stored.T @ u1
    best = c.abs().amax(0)
    rest = (u1.pow(2).sum(0) - c.pow(2).sum(0)).clamp_min(0).sqrt()
    if bool((best > rest + 1e-12).all()):
        return best
    u, _, _ = exact_svd(w0)
    return (u.float().double().T @ u1).abs().amax(0)
