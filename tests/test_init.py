"""init: function preservation, the decompositions against independent float64 references and PEFT,
reproducibility, rank patterns, and bad input."""

import json
import math

import pytest
import torch

from adaptedit.adapter import save_adapter
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build
from adaptedit.layer import attach
from adaptedit.methods import METHODS as METHOD_REGISTRY
from adaptedit.methods import delora
from adaptedit.models import resolve
from adaptedit.targets import to_w

from helpers import METHODS, WITH_DORA, perturb, run_cli

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61], [8, 1, 13, 21, 34, 55, 89, 144]])


def _init(folder, **kw):
    """init on ``folder``; rank 4 unless given, for the methods that have a rank."""
    ranked = METHOD_REGISTRY[kw.get("method", "lora")].RANKED
    return build(resolve(str(folder)), InitOptions(**{"rank": 4 if ranked else None, **kw}))


def _weight(source, info):
    return to_w(source.checkpoint.get(info.key), info.kind).double()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_at_init(fixture, dtype, request):
    folder = request.getfixturevalue(fixture)
    source = resolve(str(folder))
    model = source.load(dtype=dtype)
    with torch.no_grad():
        ref = model(IDS).logits
    for method, dora in WITH_DORA:
        rank = 4 if METHOD_REGISTRY[method].RANKED else None  # IA3, RoAd, BOFT have none
        adapter = build(source, InitOptions(method=method, rank=rank, dora=dora))
        attach(model, adapter)
        with torch.no_grad():
            got = model(IDS).logits
        assert torch.equal(ref, got), f"{method} dora={dora} changed the outputs at init"
        from adaptedit.layer import detach
        detach(model)


def test_adapter_changes_outputs_once_trained(tiny_llama):
    """The bit-identity above is not vacuous: moving θ moves the outputs."""
    source = resolve(str(tiny_llama))
    model = source.load(dtype=torch.float32)
    with torch.no_grad():
        ref = model(IDS).logits
    attach(model, perturb(build(source, InitOptions(method="pissa", rank=4, dora=True))))
    with torch.no_grad():
        assert (model(IDS).logits - ref).abs().max() > 1e-3


def test_pissa_is_best_rank_r(tiny_llama):
    source = resolve(str(tiny_llama))
    adapter = _init(tiny_llama, method="pissa", svd="full")
    for name, info in adapter.config.modules.items():
        t = adapter.tensors[name]
        w = _weight(source, info)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = info.rank
        best = (u[:, :r] * s[:r]) @ vh[:r]
        got = info.scaling * t["lora_B0"].double() @ t["lora_A0"].double()
        assert (got - best).norm() / best.norm() <= 1e-5, name


def test_milora_is_bottom_r(tiny_llama):
    source = resolve(str(tiny_llama))
    adapter = _init(tiny_llama, method="milora")
    assert adapter.config.alpha == 8.0  # MiLoRA paper: α = 2r
    for name, info in adapter.config.modules.items():
        t = adapter.tensors[name]
        w = _weight(source, info)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = info.rank
        minor = (u[:, -r:] * s[-r:]) @ vh[-r:]
        got = info.scaling * t["lora_B0"].double() @ t["lora_A0"].double()
        assert (got - minor).norm() / minor.norm() <= 1e-5, name


def test_olora_is_qr_projection(tiny_llama):
    source = resolve(str(tiny_llama))
    adapter = _init(tiny_llama, method="olora")
    for name, info in adapter.config.modules.items():
        t = adapter.tensors[name]
        w = _weight(source, info)
        q, _ = torch.linalg.qr(w)
        qr = q[:, :info.rank]
        proj = qr @ qr.T @ w
        got = t["lora_B0"].double() @ t["lora_A0"].double()
        assert (got - proj).norm() / proj.norm() <= 1e-5, name


@pytest.mark.parametrize("method,peft_init", [("pissa", "pissa"), ("olora", "olora")])
def test_matches_peft_init(tiny_llama, method, peft_init):
    """PEFT mutates the base into W − s·B₀A₀; compare products (singular vectors have signs)."""
    peft = pytest.importorskip("peft")
    source = resolve(str(tiny_llama))
    ours = _init(tiny_llama, method=method, svd="full", alpha=8)
    model = source.load(dtype=torch.float32)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                          init_lora_weights=peft_init)
    pm = peft.get_peft_model(model, cfg)
    for name, info in ours.config.modules.items():
        layer = pm.base_model.model.get_submodule(name)
        peft_prod = (before[name] - layer.base_layer.weight.detach()).double()
        t = ours.tensors[name]
        our_prod = info.scaling * t["lora_B0"].double() @ t["lora_A0"].double()
        assert torch.allclose(our_prod, peft_prod, atol=1e-4 * peft_prod.abs().max()), name


def test_randomized_svd_is_seeded_and_accurate(tiny_llama):
    a = _init(tiny_llama, method="pissa", svd="randomized", seed=1, niter=4)
    b = _init(tiny_llama, method="pissa", svd="randomized", seed=1, niter=4)
    c = _init(tiny_llama, method="pissa", svd="randomized", seed=2, niter=0, oversample=0)
    name = a.names[0]
    assert torch.equal(a.tensors[name]["lora_A0"], b.tensors[name]["lora_A0"])
    assert not torch.equal(a.tensors[name]["lora_A0"], c.tensors[name]["lora_A0"])
    assert a.config.init["captured_energy_min"] > 0.99
    assert a.config.init["captured_energy_min"] >= c.config.init["captured_energy_min"]


def test_reload_gives_same_factors(tiny_llama, tmp_path):
    dora_ok = {m for m, d in WITH_DORA if d}  # with DoRA where it is defined, else without
    for method in METHODS:
        adapter = _init(tiny_llama, method=method, dora=method in dora_ok, seed=3)
        save_adapter(adapter, tmp_path / method)
        again = load_adapter(tmp_path / method)
        assert again.config.to_json() == adapter.config.to_json()
        for name in adapter.names:
            for key, value in adapter.tensors[name].items():
                assert torch.equal(again.tensors[name][key], value), (method, name, key)


def test_rank_pattern_and_rslora(tiny_llama):
    adapter = _init(tiny_llama, method="lora", rank=4, alpha=16, rslora=True,
                    rank_pattern="mlp=8,o_proj=2")
    for name, info in adapter.config.modules.items():
        want = 8 if ".mlp." in name else 2 if name.endswith("o_proj") else 4
        assert info.rank == want
        assert adapter.tensors[name]["lora_A"].shape[0] == want
        assert math.isclose(info.scaling, 16 / math.sqrt(want))
    plain = _init(tiny_llama, method="lora", rank=4, alpha=16)
    assert all(math.isclose(i.scaling, 4.0) for i in plain.config.modules.values())


def test_rank_pattern_keeps_the_default_alpha(tiny_llama):
    """Without --rank, α's default follows the default rank (16), not the pattern's smallest
    rank: giving --rank 16 explicitly changes nothing, and the recorded rank is the global one."""
    implicit = _init(tiny_llama, method="lora", rank=None, rank_pattern="mlp=8,o_proj=2")
    explicit = _init(tiny_llama, method="lora", rank=16, rank_pattern="mlp=8,o_proj=2")
    assert implicit.config.alpha == explicit.config.alpha == 32.0
    assert implicit.config.rank == explicit.config.rank == 16
    q = "model.layers.0.self_attn.q_proj"
    assert implicit.config.modules[q].scaling == explicit.config.modules[q].scaling == 2.0
    assert implicit.config.modules["model.layers.0.mlp.up_proj"].scaling == 4.0


def test_delora_bound_holds_after_perturbation(tiny_llama):
    adapter = _init(tiny_llama, method="delora", delora_lambda=2.0)
    gen = torch.Generator().manual_seed(0)
    for name in adapter.names:
        t = adapter.tensors[name]
        assert adapter.delta_w(name).abs().max() == 0  # frozen copy: exactly zero at init
        for _ in range(5):
            t["lora_A"] = t["lora_A0"] + torch.randn(t["lora_A0"].shape, generator=gen)
            t["lora_B"] = t["lora_B0"] + 3 * torch.randn(t["lora_B0"].shape, generator=gen)
            t["delora_lambda"] = t["delora_lambda0"] * 1.7
            norm = adapter.delta_w(name).norm()
            assert 0 < norm <= delora.bound(t) * (1 + 1e-6), name


def test_dora_magnitude_is_row_norm(tiny_gpt2):
    source = resolve(str(tiny_gpt2))
    adapter = _init(tiny_gpt2, method="lora", dora=True)
    for name, info in adapter.config.modules.items():
        assert info.kind == "conv1d"
        w = _weight(source, info)
        assert torch.allclose(adapter.tensors[name]["magnitude"].double(), w.norm(dim=1), rtol=1e-6)


def test_targets_suffix_and_regex(tiny_llama):
    a = _init(tiny_llama, targets="q_proj,v_proj")
    assert a.names and all(n.endswith(("q_proj", "v_proj")) for n in a.names)
    b = _init(tiny_llama, targets=r"re:.*\.0\.mlp\..*")
    assert b.names and all(".0.mlp." in n for n in b.names)


# ---- the command line ---------------------------------------------------------------------------

def test_cli_init_writes_self_describing_folder(tiny_llama, tmp_path):
    out = tmp_path / "ad"
    code, stdout, _ = run_cli(["init", str(tiny_llama), "-m", "pissa", "-r", "4", "-o", str(out),
                               "--json"])
    assert code == 0
    header = json.loads(stdout)
    assert header["modules"] == 14 and header["method"] == "pissa"
    cfg = json.loads((out / "adaptedit.json").read_text())
    assert cfg["format_version"] == 1 and cfg["method"] == "pissa"
    assert cfg["base"]["path"] == str(tiny_llama.resolve())
    assert all(len(m["fingerprint"]) == 32 for m in cfg["modules"].values())


def test_cli_init_file_modes_follow_the_umask(tiny_llama, tmp_path):
    """Output files get 0o666 & ~umask and folders 0o777 & ~umask, as any file the user creates."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        code, _, err = run_cli(["init", str(tiny_llama), "-r", "2", "-o", str(tmp_path / "ad"),
                                "-q"])
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "ad").stat().st_mode) == 0o777 & ~0o022
    for f in (tmp_path / "ad").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~0o022, f.name


@pytest.mark.parametrize("args,needle,expect", [
    # the command line itself is wrong: usage error, exit 2
    (["-r", "0"], "positive integer", 2),
    (["-m", "nope"], "unknown method", 2),
    (["-t", ""], "--targets is empty", 2),
    (["-t", "re:["], "invalid regular expression", 2),
    (["--svd", "bogus"], "--svd", 2),
    (["--device", "tpu"], "--device", 2),
    (["--niter", "-1"], "--niter", 2),
    (["--alpha", "-1"], "--alpha", 2),
    (["--alpha", "nan"], "--alpha", 2),
    (["-m", "delora", "--delora-lambda", "0"], "--delora-lambda", 2),
    (["--dora", "--delora-lambda", "5"], "--delora-lambda applies to delora, not lora", 2),
    (["--rank-pattern", "mlp"], "is not NAME=NUMBER", 2),
    (["--rank-pattern", "mlp=2,mlp=3"], "given twice", 2),
    (["--rank-pattern", "re:[=2"], "not a valid regular expression", 2),
    # wrong for this model or this machine: runtime error, exit 1
    (["-r", "40"], "exceeds min(out, in)", 1),
    (["-t", "nothing_here"], "matches no module", 1),
    (["--rank-pattern", "nomatch=2"], "'nomatch' matches none of the targeted modules", 1),
    (["--device", "cuda"], "no CUDA", 1),
])
def test_cli_init_bad_input(tiny_llama, tmp_path, args, needle, expect):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "ad"
    code, _, stderr = run_cli(["init", str(tiny_llama), "-o", str(out), *args])
    assert code == expect, stderr
    assert needle in stderr and stderr.startswith("error:") and stderr.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_init_rank_error_names_module(tiny_llama, tmp_path):
    code, _, stderr = run_cli(["init", str(tiny_llama), "-o", str(tmp_path / "x"),
                               "--rank-pattern", "k_proj=20"])
    assert code == 1 and "k_proj" in stderr


def test_cli_init_refuses_existing_out_and_force_replaces(tiny_llama, tmp_path):
    out = tmp_path / "ad"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, stderr = run_cli(["init", str(tiny_llama), "-o", str(out), "-r", "2"])
    assert code == 1 and "--force" in stderr and (out / "keep.txt").exists()
    code, _, _ = run_cli(["init", str(tiny_llama), "-o", str(out), "-r", "2", "--force", "-q"])
    assert code == 0 and not (out / "keep.txt").exists() and (out / "adaptedit.json").exists()


def test_cli_init_nan_weight_names_tensor(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    st = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    st[key][0, 0] = float("nan")
    save_file(st, bad / "model.safetensors", metadata={"format": "pt"})
    code, _, stderr = run_cli(["init", str(bad), "-o", str(tmp_path / "ad")])
    assert code == 1 and key in stderr and "NaN" in stderr
    assert not (tmp_path / "ad").exists()


def test_adapter_with_unknown_method_names_its_config(tiny_llama, tmp_path):
    out = tmp_path / "ad"
    assert run_cli(["init", str(tiny_llama), "-o", str(out), "-r", "2", "-q"])[0] == 0
    cfg = json.loads((out / "adaptedit.json").read_text())
    (out / "adaptedit.json").write_text(json.dumps({**cfg, "method": "future-method"}))
    code, _, err = run_cli(["inspect", str(out)])
    assert code == 1 and "adaptedit.json: unknown method 'future-method'" in err


def test_a_method_default_targets_matching_nothing_say_so(tiny_bert, tmp_path):
    """ia3's default targets are PEFT's (k_proj, v_proj, down_proj); on BERT they match nothing:
    the error says they are the method's defaults, not something the user typed."""
    from adaptedit import methods

    code, _, err = run_cli(["init", str(tiny_bert), "-m", "ia3", "-o", str(tmp_path / "x")])
    assert code == 1 and err.count("\n") == 1, err
    spec = methods.get("ia3").TARGETS
    assert spec.startswith("k_proj,v_proj,down_proj")
    assert f"ia3's default targets ({spec}) match no module of this model" in err
    assert "choose them with --targets" in err and "--targets 'k_proj" not in err
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(["init", str(tiny_bert), "-m", "ia3", "--targets", "nothing",
                            "-o", str(tmp_path / "x")])
    assert code == 1 and "--targets 'nothing' matches no module" in err
