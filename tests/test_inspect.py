"""`inspect` on tiny checkpoints: expected geometry of known methods, parity between the ways of
getting ΔW (factors, dense, two checkpoints, PEFT), the CLI, the plots and the bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

from adaptedit.formats import load_adapter
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.init import InitOptions, build
from adaptedit.analysis import Options, inspect_adapters, inspect_checkpoints
from adaptedit.models import resolve
from adaptedit.targets import from_w, to_w


def make(base, folder, *, method="lora", rank=4, dora=False, noise=0.05, seed=1, also_a=False,
         lam=None, **kw):
    """init an adapter and move θ away from θ₀ by a seeded perturbation of B (and A)."""
    ad = build(resolve(str(base)), InitOptions(method=method, rank=rank, dora=dora, **kw))
    g = torch.Generator().manual_seed(seed)
    for t in ad.tensors.values():
        if noise:
            t["lora_B"] = t["lora_B"] + noise * torch.randn(t["lora_B"].shape, generator=g)
            if also_a:
                t["lora_A"] = t["lora_A"] + noise * torch.randn(t["lora_A"].shape, generator=g)
            if dora:
                t["magnitude"] = t["magnitude"] * (1 + noise * torch.rand(t["magnitude"].shape,
                                                                         generator=g))
        if lam is not None:
            t["delora_lambda"] = t["delora_lambda"] * lam
    ad.save(folder)
    return folder


def by_name(report):
    return {r["name"]: r for r in report["modules"]}


# ---------------------------------------------------------------------------------------------
# what known methods should look like


def test_untrained_adapter_is_exactly_zero(tiny_llama, tmp_path):
    for method in ("lora", "pissa", "delora"):
        folder = make(tiny_llama, tmp_path / method, method=method, noise=0)
        rep = inspect_adapters([folder])
        assert rep["model"]["zero"] == rep["model"]["modules"] == 14
        assert all(r["fro"] == 0.0 and r["zero"] for r in rep["modules"])
        assert "ΔW = 0 exactly" in rep["verdict"]


def test_pissa_concentrates_in_top_milora_in_bottom(tiny_llama, tmp_path):
    # a small step from θ₀ (as early in training): ΔW ≈ s(δB A₀ + B₀ δA), second order negligible
    pissa = inspect_adapters([make(tiny_llama, tmp_path / "p", method="pissa", also_a=True,
                                   noise=0.002)])
    milora = inspect_adapters([make(tiny_llama, tmp_path / "m", method="milora", also_a=True,
                                    noise=0.002)])
    p, m = pissa["model"], milora["model"]
    assert p["e_top"] > 0.9 and p["e_bottom"] < 0.5
    assert m["e_bottom"] > 0.9 and m["e_top"] < 0.5
    assert "principal subspace" in pissa["verdict"]
    assert "minor subspace" in milora["verdict"]
    # B perturbed only: ΔW = s·δB·A₀, whose input side lies in W₀'s top-r right subspace exactly
    only_b = inspect_adapters([make(tiny_llama, tmp_path / "pb", method="pissa")])
    assert all(r["e_top_in"] == pytest.approx(1, abs=1e-5) for r in only_b["modules"])


def test_adapter_matches_dense_reference(tiny_llama, tmp_path):
    """Factor path vs ΔW = adapter.delta_w computed densely and measured in float64."""
    folder = make(tiny_llama, tmp_path / "a", method="lora", also_a=True)
    rep = by_name(inspect_adapters([folder]))
    ad = load_adapter(folder)
    src = resolve(str(tiny_llama))
    for name in ad.names[:3]:
        info = ad.config.modules[name]
        w0 = to_w(src.checkpoint.get(info.key), info.kind).double()
        d = ad.delta_w(name).double()
        u0, _, vh0 = torch.linalg.svd(w0, full_matrices=False)
        k = info.rank
        e_top_out = float((u0[:, :k].T @ d).pow(2).sum() / d.pow(2).sum())
        e_top_in = float((d @ vh0[:k].T).pow(2).sum() / d.pow(2).sum())
        assert rep[name]["fro"] == pytest.approx(float(d.norm()), rel=1e-5)
        assert rep[name]["e_top_out"] == pytest.approx(e_top_out, rel=1e-4, abs=1e-6)
        assert rep[name]["e_top_in"] == pytest.approx(e_top_in, rel=1e-4, abs=1e-6)
        assert rep[name]["spectral"] == pytest.approx(float(torch.linalg.matrix_norm(d, 2)),
                                                      rel=1e-5)


def _tuned_copy(base, adapter_folder, out):
    """A checkpoint folder whose targeted weights are W₀ + ΔW of the adapter (a 'fine-tune')."""
    shutil.copytree(base, out)
    ad = load_adapter(adapter_folder)
    f = out / "model.safetensors"
    state = load_file(str(f))
    for name in ad.names:
        info = ad.config.modules[name]
        w = to_w(state[info.key], info.kind)
        state[info.key] = from_w(w.double() + ad.delta_w(name, w).double(), info.kind).float()
    save_file(state, str(f), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_two_checkpoints_match_adapter(fixture, request, tmp_path):
    base = request.getfixturevalue(fixture)
    folder = make(base, tmp_path / "a", method="pissa", also_a=True)
    tuned = _tuned_copy(base, folder, tmp_path / "tuned")
    a = by_name(inspect_adapters([folder]))
    c = by_name(inspect_checkpoints(str(base), str(tuned), opts=Options(k=4)))
    assert set(a) == set(c)
    for name in a:
        for key in ("fro", "e_top_out", "e_top_in", "e_bottom_out", "delta_m", "delta_d"):
            assert c[name][key] == pytest.approx(a[name][key], rel=2e-3, abs=1e-5), (name, key)
        assert c[name]["intruders"] == a[name]["intruders"]


def test_identical_checkpoints(tiny_llama):
    rep = inspect_checkpoints(str(tiny_llama), str(tiny_llama))
    assert rep["model"]["zero"] == rep["model"]["modules"]
    assert "identical checkpoints" in rep["verdict"]


def test_dora_and_delora_extras(tiny_llama, tmp_path):
    dora = inspect_adapters([make(tiny_llama, tmp_path / "d", method="lora", dora=True)])
    r = dora["modules"][0]
    assert r["method"]["dora_magnitude_rel"] > 0 and r["fro"] > 0
    delora = inspect_adapters([make(tiny_llama, tmp_path / "l", method="delora", lam=1.3)])
    fr = [r["method"]["delora_fraction"] for r in delora["modules"]]
    assert all(0 < f <= 1 for f in fr)


def test_trajectory_and_cache(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path / "cache"))  # empty: this test's own
    folder = make(tiny_llama, tmp_path / "run", method="lora", noise=0.03)
    for step, noise in ((10, 0.01), (20, 0.02), (30, 0.03)):
        make(tiny_llama, folder / "checkpoints" / f"step-{step:06d}", method="lora", noise=noise)
    first = inspect_adapters([folder], trajectory=True)
    assert first["svd_cache"] == {"hits": 0, "computed": 14}
    rep = inspect_adapters([folder], trajectory=True)
    assert [p["step"] for p in rep["points_sources"]] == [10, 20, 30]
    assert len(rep["md"]["points"]) == 3 * 14
    corr = rep["md"]["correlation"]
    assert set(corr["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"}
    assert corr["mean"] is not None and -1 <= corr["mean"] <= 1
    assert rep["svd_cache"]["hits"] == 14  # the base SVDs cached by the first call, one per module
    with pytest.raises(AdapteditError, match="no training checkpoints"):
        inspect_adapters([make(tiny_llama, tmp_path / "plain", noise=0.01)], trajectory=True)
    # with a second adapter the points mixed the first one's final state (a duplicate of its last
    # checkpoint, labelled step None) with the other's final state, and no checkpoint of the other
    with pytest.raises(UsageError, match="checkpoints of one adapter"):
        inspect_adapters([folder, tmp_path / "plain"], trajectory=True)


def test_peft_adapter_gives_the_same_numbers(tiny_llama, tmp_path):
    from adaptedit.peft_io import export_peft

    folder = make(tiny_llama, tmp_path / "a", method="lora", also_a=True)
    export_peft(load_adapter(folder), tmp_path / "peft")
    native_rep = inspect_adapters([folder])
    peft_rep = inspect_adapters([tmp_path / "peft"], base=str(tiny_llama))
    # the model's module order (q, k, v, o, gate, up, down), not PEFT's file order (by name)
    assert [m["name"] for m in peft_rep["modules"]] == [m["name"] for m in native_rep["modules"]]
    native, peft = by_name(native_rep), by_name(peft_rep)
    for name in native:
        for key in ("fro", "rel", "delta_m", "delta_d", "e_top", "e_bottom", "phi",
                    "effective_rank", "intruders"):
            assert peft[name][key] == pytest.approx(native[name][key], rel=1e-5, abs=1e-8)


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_json_schema(tiny_llama, tmp_path):
    folder = make(tiny_llama, tmp_path / "a", method="pissa")
    code, out, err = run_cli(["inspect", str(folder), "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["schema"] == "adaptedit.inspect" and rep["schema_version"] == 1
    for key in ("mode", "base", "adapter", "tuned", "options", "verdict", "model", "by_type",
                "by_layer", "modules", "md", "svd_cache", "notes", "seconds"):
        assert key in rep, key
    mod = rep["modules"][0]
    for key in ("name", "type", "layer", "shape", "k", "zero", "fro", "rel", "spectral",
                "delta_m", "delta_d", "e_top_out", "e_top_in", "e_bottom_out", "e_bottom_in",
                "e_top", "e_bottom", "e_random", "angles_deg", "phi", "amplification",
                "effective_rank", "stable_rank", "energy_rank_90", "energy_rank_99", "intruders",
                "intruder_cos", "spectrum_delta", "spectrum_base", "base_svd", "method"):
        assert key in mod, key
    assert set(rep["by_layer"]) == {"0", "1"}
    assert rep["md"]["correlation"]["reference"]["lora"] == 0.83


def test_cli_table_sort_top(tiny_llama, tmp_path):
    folder = make(tiny_llama, tmp_path / "a", method="lora")
    code, out, err = run_cli(["inspect", str(folder), "--sort", "delta_d", "--top", "3", "-q"])
    assert code == 0, err
    assert "top 3 by delta_d" in out and "verdict:" in out
    code, _, err = run_cli(["inspect", str(folder), "--sort", "nope"])
    assert code == 2 and "--sort" in err


def test_cli_plot_and_html(tiny_llama, tmp_path):
    folder = make(tiny_llama, tmp_path / "a", method="pissa")
    code, out, err = run_cli(["inspect", str(folder), "--plot", str(tmp_path / "plots"),
                              "--html", str(tmp_path / "r.html"), "-q"])
    assert code == 0, err
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert {"md_scatter.png", "spectrum.png", "heatmap_rel.png", "heatmap_e_top.png"} <= set(pngs)
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "verdict" in page and "model.layers.1.mlp.down_proj" in page
    assert "http://" not in page and "https://" not in page  # self-contained


def test_cli_checkpoints(tiny_llama, tmp_path):
    tuned = _tuned_copy(tiny_llama, make(tiny_llama, tmp_path / "a"), tmp_path / "tuned")
    code, out, err = run_cli(["inspect", "--base", str(tiny_llama), "--tuned", str(tuned),
                              "--json", "--targets", "q_proj,v_proj"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["mode"] == "checkpoints" and len(rep["modules"]) == 4


# ---------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit


def test_bad_inputs(tiny_llama, tiny_gpt2, tmp_path):
    from fixtures import make_tiny_llama

    folder = make(tiny_llama, tmp_path / "a")
    other = make_tiny_llama(tmp_path / "other", seed=7)  # same shapes, other weights

    def fails(args, *words, code=1):
        c, out, err = run_cli(args)
        assert c == code, (args, c, err)
        line = err.strip().splitlines()[-1]
        assert line.startswith("error:") or code == 2, err
        for w in words:
            assert w in err, (w, err)

    fails(["inspect", str(folder), "--base", str(other)], "differs", "--base")
    fails(["inspect", str(folder), "--base", str(tiny_gpt2)], "does not exist in base")
    fails(["inspect", "--base", str(tiny_llama), "--tuned", str(tiny_gpt2)], "GPT2")
    fails(["inspect", str(folder), "--k", "500"], "--k 500", "min(out, in)", code=2)
    fails(["inspect", str(folder), "--targets", "nothing_here"], "matches no module")
    fails(["inspect"], "ADAPTER_DIR", code=2)
    fails(["inspect", str(folder), "--tuned", str(tiny_llama)], "not both", code=2)
    fails(["inspect", str(folder), "--intruder-eps", "2"], "--intruder-eps", code=2)
    fails(["inspect", str(tmp_path / "missing")], "no such adapter folder")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    data = (broken / "adapter.safetensors").read_bytes()
    (broken / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    fails(["inspect", str(broken)], "adapter.safetensors")
    bad_base = tmp_path / "bad_base"
    shutil.copytree(tiny_llama, bad_base)
    raw = (bad_base / "model.safetensors").read_bytes()
    (bad_base / "model.safetensors").write_bytes(raw[:1000])
    fails(["inspect", "--base", str(bad_base), "--tuned", str(tiny_llama)], "model.safetensors")


def test_shape_mismatch_names_the_tensor(tiny_llama, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(tiny_llama)
    cfg.intermediate_size = 48
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "wide")
    code, _, err = run_cli(["inspect", "--base", str(tiny_llama), "--tuned",
                            str(tmp_path / "wide")])
    assert code == 1 and "model.layers.0.mlp.down_proj.weight" in err


def test_missing_matplotlib_is_a_clear_error(tiny_llama, tmp_path, monkeypatch):
    import sys

    folder = make(tiny_llama, tmp_path / "a")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(["inspect", str(folder), "--plot", str(tmp_path / "p")])
    assert code == 1 and "pip install 'adaptedit[plot]'" in err


def test_randomized_base_svd_and_damaged_cache(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTEDIT_CACHE", str(tmp_path / "cache"))
    folder = make(tiny_llama, tmp_path / "a", method="pissa", also_a=True, noise=0.002)
    exact = by_name(inspect_adapters([folder]))
    rep = inspect_adapters([folder], opts=Options(svd="randomized"))
    r = rep["modules"][0]
    assert r["base_svd"] == "randomized" and r["e_bottom"] is None and not r["intruders_exact"]
    assert 0.99 < r["base_svd_accuracy"]["captured_energy"] <= 1.0 + 1e-6  # rank ≥ min(out, in)
    note = next(n for n in rep["notes"] if "randomized" in n)
    worst = max(rep["modules"], key=lambda m: m["base_svd_accuracy"]["max_residual"])
    assert f"randomized for {len(rep['modules'])} module(s)" in note and "--svd full" in note
    assert f"{worst['base_svd_accuracy']['max_residual']:.2g}, {worst['name']})" in note
    assert r["e_top"] == pytest.approx(exact[r["name"]]["e_top"], abs=1e-3)
    # a damaged cache entry is recomputed, not trusted
    for f in (tmp_path / "cache" / "svd").glob("*-full.safetensors"):
        f.write_bytes(b"garbage")
    again = by_name(inspect_adapters([folder]))
    assert again[r["name"]]["e_top"] == pytest.approx(exact[r["name"]]["e_top"], rel=1e-6)
    assert inspect_adapters([folder])["svd_cache"]["hits"] == 14


def test_verdict_is_relative_to_a_random_update():
    """E_top alone misleads when k is a large share of the dimensions: isotropic noise with
    E_top ≈ E_bottom ≈ 0.7 and a random baseline of 0.77 is spread, not concentrated."""
    from adaptedit.aggregate import verdict

    base = {"modules": 4, "zero": 0, "rel": 0.01, "intruders": 0}
    noise = verdict({**base, "e_top": 0.69, "e_bottom": 0.70, "e_random": 0.77}, "checkpoints")
    assert "spread across the spectrum" in noise
    top = verdict({**base, "e_top": 0.82, "e_bottom": 0.02, "e_random": 0.055}, "adapter")
    assert "principal subspace" in top
    low = verdict({**base, "e_top": 0.03, "e_bottom": 0.9, "e_random": 0.055}, "adapter")
    assert "minor subspace" in low


def test_layer_grid_survives_non_finite_values():
    """One exponent per grid is chosen from the finite values; NaN cells print, nothing raises."""
    from rich.console import Console

    from adaptedit.commands.inspect_cmd import summary_table

    mods = [{"name": f"m.layers.{i}.q_proj", "layer": i, "type": "q_proj", "rel": v}
            for i, v in enumerate([0.004, float("nan"), float("inf")])]
    report = {"modules": mods, "by_layer": {}, "by_type": {"q_proj": {"rel": 0.004}},
              "model": {"rel": 0.004}}
    con = Console(width=80, record=True)
    con.print(summary_table(report))
    text = con.export_text()
    assert "×1e-3" in text and "nan" in text and "4.00" in text


def test_figures_do_not_depend_on_the_thread_count(tiny_llama, tmp_path):
    """Modules are analysed one thread each (linalg.one_thread_each): the report with torch's 2
    threads is the report of a single thread, bit for bit, in module order — trajectory points
    and two-checkpoint mode included."""
    folder = make(tiny_llama, tmp_path / "run", method="pissa", noise=0.03, also_a=True)
    make(tiny_llama, folder / "checkpoints" / "step-000010", method="pissa", noise=0.01)
    before = torch.get_num_threads()
    reports = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            rep = inspect_adapters([folder], trajectory=True, opts=Options(cache=False))
            rep2 = inspect_checkpoints(str(tiny_llama), str(tiny_llama), opts=Options(cache=False))
            for r in (rep, rep2):
                r.pop("seconds")
            reports[n] = (rep, rep2)
    finally:
        torch.set_num_threads(before)
    assert reports[1] == reports[2]
    from adaptedit.formats import load_adapter

    names = [r["name"] for r in reports[2][0]["modules"]]
    assert names == list(load_adapter(folder).config.modules)  # the adapter's module order
    assert [p["label"] for p in reports[2][0]["md"]["points"][:2]] == ["step-000010", "final"]
