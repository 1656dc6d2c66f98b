"""inspect --plot for the methods that expose per-index or per-channel vectors (VECTORS/vectors):
SVFT and SSVD ΔΣ per singular index, IA3/VeRA/RoAd gain distributions per layer type. The files
are written, and the plotted data (line y-values, histogram counts) equal the adapter's tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import perturb, run_cli

from adaptedit import method_plots
from adaptedit.adapter import save_adapter
from adaptedit.init import InitOptions, build
from adaptedit.models import resolve

def _col(key, fn=None):
    def get(t):
        v = t[key].double().numpy()
        return fn(v) if fn else v
    return get


def _turn(t):
    """‖(G − I) e_i‖ with G = (I − S)(I + S)⁻¹ formed explicitly in float64."""
    k = t["ssvd_dsigma"].numel()
    s = np.zeros((k, k))
    s[np.triu_indices(k, 1)] = t["ssvd_S"].double().numpy()
    s = s - s.T
    g = (np.eye(k) - s) @ np.linalg.inv(np.eye(k) + s)
    return np.linalg.norm(g - np.eye(k), axis=0)


CASES = {  # method, init options, {vector: (kind, its value from the adapter's tensors)}
    "svft": (dict(rank=4), {"dsigma": ("by_index", _col("svft_m"))}),
    "ssvd": (dict(rank=4), {"dsigma": ("by_index", _col("ssvd_dsigma")),
                            "rotation": ("by_index", _turn)}),
    "ia3": (dict(), {"gain": ("distribution", _col("ia3_l"))}),
    "vera": (dict(rank=8), {"b": ("distribution", _col("vera_lambda_b")),
                            "d": ("distribution", _col("vera_lambda_d"))}),
    "road": (dict(), {"alpha": ("distribution", _col("road_alpha")),
                      "angle_deg": ("distribution", _col("road_theta",
                                                         lambda x: np.abs(x) * 180 / np.pi))}),
}


@pytest.fixture(scope="module")
def inspected(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("method-plots")
    out = {}
    for method, (kw, _) in CASES.items():
        ad = perturb(build(resolve(str(tiny_llama)), InitOptions(method=method, **kw)), 1)
        save_adapter(ad, root / method)
        code, stdout, err = run_cli(["inspect", str(root / method), "--plot", str(root / f"p-{method}"),
                                     "--json", "-q"])
        assert code == 0, err
        out[method] = (ad, json.loads(stdout), root / f"p-{method}")
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_files_written_and_data_equal_the_tensors(method, inspected):
    ad, report, folder = inspected[method]
    data = method_plots.method_vectors(report)
    want = CASES[method][1]
    assert set(data) == set(want)
    for name, (kind, get) in want.items():
        png = folder / f"{kind}_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in report["written"]
        assert set(data[name]["modules"]) == set(ad.names)
        for mod, entry in data[name]["modules"].items():
            ref = get(ad.tensors[mod])
            tol = 1e-6 if name == "rotation" else 1e-12  # G through float32 solve vs float64 inverse
            assert np.allclose(entry["values"], ref, rtol=0, atol=tol * max(1.0, np.abs(ref).max()))
            rec = next(r for r in report["modules"] if r["name"] == mod)
            assert entry["type"] == rec["type"] and entry["layer"] == rec["layer"]


@pytest.mark.parametrize("method", ["svft", "ssvd"])
def test_by_index_lines_are_the_vectors(method, inspected):
    ad, report, _ = inspected[method]
    data = method_plots.method_vectors(report)
    fig = method_plots.by_index(data["dsigma"])
    lines = {ln.get_gid(): ln.get_ydata() for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    get = CASES[method][1]["dsigma"][1]
    for mod in ad.names:
        assert np.allclose(lines[mod], get(ad.tensors[mod]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,name", [("ia3", "gain"), ("vera", "b"), ("road", "alpha")])
def test_histogram_counts_are_the_vectors(method, name, inspected):
    ad, report, _ = inspected[method]
    data = method_plots.method_vectors(report)
    fig = method_plots.distribution(data[name])
    get = CASES[method][1][name][1]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        typ = ax.get_title().split(":")[0]
        vals = np.concatenate([get(ad.tensors[m])
                               for m, e in data[name]["modules"].items() if e["type"] == typ])
        counts = [p.get_height() for p in ax.patches]
        assert np.array_equal(counts, np.histogram(vals, bins=method_plots.BINS)[0])


def test_no_method_vectors_no_extra_plots(tiny_llama, tmp_path):
    save_adapter(perturb(build(resolve(str(tiny_llama)), InitOptions(method="lora", rank=2))),
                 tmp_path / "ad")
    code, _, err = run_cli(["inspect", str(tmp_path / "ad"), "--plot", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    assert not list((tmp_path / "p").glob("by_index_*")) and not list((tmp_path / "p").glob("distribution_*"))


def test_existing_method_plot_refused_without_force(inspected, tmp_path):
    ad, report, folder = inspected["svft"]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "by_index_dsigma.png").write_bytes((folder / "by_index_dsigma.png").read_bytes())
    code, _, err = run_cli(["inspect", str(ad.path), "--plot", str(tmp_path / "p"), "-q"])
    assert code != 0 and "by_index_dsigma.png already exists" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1


def test_by_index_many_modules_draw_the_median_and_band():
    """Above LINES_MAX modules a panel shows the median and the 10-90% band over its modules
    (numpy's percentiles of the stacked vectors are the reference), and the mean |·| line."""
    g = np.random.default_rng(0)
    n = method_plots.LINES_MAX + 5
    vals = {f"model.layers.{i}.q_proj": g.normal(size=12) * (i + 1) for i in range(n)}
    entry = {"kind": "by_index", "label": "ΔΣ", "method": "svft",
             "modules": {k: {"type": "q_proj", "layer": i, "values": v}
                         for i, (k, v) in enumerate(vals.items())}}
    fig = method_plots.by_index(entry)
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln.get_ydata() for ln in ax.get_lines() if ln.get_gid()}
    assert set(lines) == {"median", "mean_abs"}  # no per-module lines
    stack = np.stack(list(vals.values()))
    assert np.allclose(lines["median"], np.median(stack, axis=0), rtol=0, atol=1e-12)
    assert np.allclose(lines["mean_abs"], np.abs(stack).mean(axis=0), rtol=0, atol=1e-12)
    band = next(c for c in ax.collections if c.get_gid() == "band")
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    lo, hi = np.percentile(stack, [10, 90], axis=0)
    for edge in (lo, hi):  # every point of both edges is a vertex of the band
        assert np.abs(ys[None, :] - edge[:, None]).min(axis=1).max() < 1e-12
    assert "median and spread" in fig._suptitle.get_text()
