"""BOFT: butterfly product of block-diagonal Cayley rotations, and an output scale
(adaptedit/methods/boft.py, adaptedit/methods/peft_boft.py).

PEFT computes more than one butterfly factor only with its CUDA extension (fbd_cuda: a block-diagonal
kernel); on CPU it falls back to one factor. Where a test needs PEFT with m > 1 it replaces that
kernel by torch.block_diag (``_peft_fbd``): every other step (permutations, Cayley, product order,
scale, bias) is PEFT's own code.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import init_is_identity, logits, perturb, run_cli
from orthogonal import (export_matches_peft, merge_matches_adapter, peft_logits,
                        train_and_resume_exact)

from adaptedit.errors import AdapteditError, UsageError
from adaptedit.formats import load_adapter
from adaptedit.init import InitOptions, build
from adaptedit.layer import attach
from adaptedit.methods import boft
from adaptedit.models import resolve
from adaptedit.peft_io import export_peft
from adaptedit.targets import Target


class _BlockDiag:
    """Stands in for PEFT's fbd_cuda kernel: (N, D, H, H) → [(N, D·H, D·H) block-diagonal]."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*xi.unbind(0)) for xi in x])]


@pytest.fixture
def _peft_fbd(monkeypatch):
    import peft.tuners.boft.layer as layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: _BlockDiag)


def _opts(bs, m, **kw):
    return dict(method="boft", options={"block_size": bs, "butterfly_factors": m}, **kw)


def _targets(*ins):
    return [Target(f"m{i}", "linear", 8, n, f"m{i}.weight", False) for i, n in enumerate(ins)]


def _reference_m(q: torch.Tensor, n_in: int) -> torch.Tensor:
    """M = B_{m−1} ⋯ B₀ in float64 from the definition, with PEFT's permutation code:
    B_i = P_i blockdiag(Cayley(Q_i,k)) P_iᵀ, P_i[j, perm_i[j]] = 1."""
    from peft.tuners.boft.layer import BOFTLayer

    m, n, _ = q.shape
    bs = n_in // n
    eye = torch.eye(bs, dtype=torch.float64)
    out = torch.eye(n_in, dtype=torch.float64)
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, n_in, n // 2 ** i, bs // 2, m - 1)
        p = BOFTLayer.perm2mat(None, perm).double()
        rs = []
        for k in range(n):
            s = torch.zeros(bs, bs, dtype=torch.float64)
            s[tuple(torch.triu_indices(bs, bs, 1))] = q[i, k].double()
            s = s - s.T
            rs.append((eye - s) @ torch.linalg.inv(eye + s))
        out = p @ torch.block_diag(*rs) @ p.T @ out
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_is_the_base_bit_for_bit(tiny_llama, tiny_gpt2, dtype):
    init_is_identity(tiny_llama, dtype, method="boft")
    init_is_identity(tiny_llama, dtype, **_opts(2, 4))
    init_is_identity(tiny_gpt2, dtype, method="boft")  # GPT-2's Conv1D, with biases


@pytest.mark.parametrize("bs,m", [(4, 1), (4, 2), (2, 3), (8, 2)])
def test_merged_and_forward_are_the_butterfly_product(tiny_llama, bs, m):
    """W' = diag(s) W Mᵀ against a float64 reference built from the definition; M orthogonal;
    the layer's forward gives x W'ᵀ."""
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(**_opts(bs, m))), 2, 0.3)
    src = resolve(str(tiny_llama))
    model = attach(src.load(dtype=torch.float32), ad)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        info, t = ad.config.modules[name], ad.tensors[name]
        assert t["boft_R"].shape == (m, info.shape[1] // bs, bs * (bs - 1) // 2)
        mref = _reference_m(t["boft_R"], info.shape[1])
        assert (mref.T @ mref - torch.eye(info.shape[1], dtype=torch.float64)).abs().max() <= 1e-12
        w = src.checkpoint.get(info.key).double()
        expect = t["boft_s"].double().unsqueeze(1) * (w @ mref.T)
        assert (ad.merged(name, w.float()).double() - expect).abs().max() <= 1e-5
        xi = x[:, :info.shape[1]]
        with torch.no_grad():
            y = model.get_submodule(name)(xi).double()
        assert (y - xi.double() @ expect.T).abs().max() <= 1e-5  # no bias in the tiny llama
        blocks = boft.dense_blocks(t, info)  # M's diagonal blocks of b·2^(m−1)
        size = bs * 2 ** (m - 1)
        assert (torch.block_diag(*blocks) - mref).abs().max() <= 1e-6 and blocks.shape[-1] == size


def test_plan_defaults_fit_every_module_and_refusals_name_it():
    assert boft.plan(_targets(64, 96), {}, {}, False)[1] == {"block_size": 4,
                                                             "butterfly_factors": 2}
    ranks, opts = boft.plan(_targets(64, 36), {}, {}, False)  # 36 = 4·9: no b·2 fits with b = 4
    assert opts == {"block_size": 2, "butterfly_factors": 2} and ranks == {"m0": 32, "m1": 18}
    ranks, opts = boft.plan(_targets(64, 30), {}, {}, False)  # no b·2 | 30: one factor (OFT-like)
    assert opts == {"block_size": 2, "butterfly_factors": 1} and ranks == {"m0": 32, "m1": 15}
    with pytest.raises(AdapteditError, match=r"no block size ≥ 2 fits 1 butterfly factor\(s\) on "
                                             r"every targeted module \(input widths 33, 64\)"):
        boft.plan(_targets(64, 33), {}, {}, False)
    with pytest.raises(AdapteditError, match=r"--block-size 4 with 3 butterfly factor\(s\) does "
                                             r"not fit the 36 inputs of m1: BOFT needs a multiple "
                                             r"of b·2\^\(m−1\) = 16"):
        boft.plan(_targets(64, 36), {}, {"block_size": 4, "butterfly_factors": 3}, False)
    with pytest.raises(AdapteditError, match="an even block size"):
        boft.plan(_targets(48), {}, {"block_size": 3, "butterfly_factors": 2}, False)
    with pytest.raises(AdapteditError, match="lower --butterfly-factors"):
        boft.plan(_targets(64, 36), {}, {"butterfly_factors": 4}, False)
    assert boft.plan(_targets(48), {}, {"block_size": 3, "butterfly_factors": 1}, False)[1] == \
        {"block_size": 3, "butterfly_factors": 1}
    with pytest.raises(UsageError, match="--butterfly-factors 0: must be an integer ≥ 1"):
        boft.plan(_targets(64), {}, {"butterfly_factors": 0}, False)


def test_cli_options_and_refusals(tiny_llama, tmp_path):
    code, out, err = run_cli(["init", str(tiny_llama), "-m", "boft", "--json", "-o",
                              str(tmp_path / "a")])
    assert code == 0, err
    cfg = json.loads((tmp_path / "a" / "adaptedit.json").read_text())
    assert cfg["init"]["block_size"] == 4 and cfg["init"]["butterfly_factors"] == 2
    # per module: m·(in/b) blocks × b(b−1)/2 entries, plus one scale per output
    n = sum(2 * (o_i[1] // 4) * 6 + o_i[0] for o_i in (m["shape"] for m in cfg["modules"].values()))
    assert json.loads(out)["trainable_parameters"] == n
    for args, what, rc in (
            (["--block-size", "6"], "--block-size 6 with 2 butterfly factor(s) does not fit the "
                                    "32 inputs of model.layers.0", 1),
            (["--dora"], "--dora on boft: BOFT already trains a magnitude per output", 1),
            (["--rank", "4"], "--rank does not apply to boft", 2),
            (["--coft-eps", "0.1"], "--coft-eps applies to oft, not boft", 2)):
        code, _, err = run_cli(["init", str(tiny_llama), "-m", "boft", *args, "-o",
                                str(tmp_path / "b")])
        assert code == rc and what in err and err.count("\n") == 1, err
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "lora", "--butterfly-factors", "2",
                            "-o", str(tmp_path / "c")])
    assert code == 2 and "--butterfly-factors applies to boft, not lora" in err, err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_export_gives_peft_logits_on_cpu(tiny_llama, tiny_bert, tmp_path):
    """One factor: PEFT's own CPU path, no extension needed (the BERT fixture has biases)."""
    cfg = export_matches_peft(tiny_llama, tmp_path / "l", **_opts(4, 1))
    assert cfg["peft_type"] == "BOFT" and cfg["boft_block_size"] == 4
    assert cfg["boft_n_butterfly_factor"] == 1 and cfg["boft_block_num"] == 0
    export_matches_peft(tiny_bert, tmp_path / "b", **_opts(8, 1))


@pytest.mark.parametrize("bs,m", [(4, 2), (2, 3)])
def test_export_folds_butterflies_into_one_peft_factor(tiny_llama, tiny_bert, tmp_path, bs, m):
    """m > 1 is written as PEFT's one factor of blocks of b·2^(m−1) (M's diagonal blocks), which
    PEFT computes on its CPU path too: same logits."""
    cfg = export_matches_peft(tiny_llama, tmp_path / "l", **_opts(bs, m))
    assert cfg["boft_n_butterfly_factor"] == 1 and cfg["boft_block_size"] == bs * 2 ** (m - 1)
    export_matches_peft(tiny_bert, tmp_path / "b", **_opts(bs, m))


def test_export_refusals_and_round_trip(tiny_llama, tiny_gpt2, tmp_path):
    with pytest.raises(AdapteditError, match="PEFT's BOFT does not wrap GPT-2's Conv1D"):
        export_peft(build(resolve(str(tiny_gpt2)), InitOptions(method="boft")), tmp_path / "g")
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(**_opts(4, 1))), 3, 0.2)
    export_peft(ad, tmp_path / "p")
    back = load_adapter(tmp_path / "p")
    assert back.config.method == "boft" and back.config.source == "peft"
    for name, ts in ad.tensors.items():  # export(import) is the identity on the tensors
        for k, v in ts.items():
            assert torch.equal(v, back.tensors[name][k]), (name, k)
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(**_opts(4, 2))), 3, 0.2)
    assert "2 butterfly factors of blocks of 4" in export_peft(ad, tmp_path / "f")["folded"]
    back = load_adapter(tmp_path / "f")  # one factor of blocks of 8: the same function
    assert back.config.init == {"block_size": 8, "butterfly_factors": 1,
                                "peft": back.config.init["peft"]}
    for name in ad.names:
        w = resolve(str(tiny_llama)).checkpoint.get(ad.config.modules[name].key)
        assert (ad.merged(name, w) - back.merged(name, w)).abs().max() <= 1e-5
    name = ad.names[0]  # a half-turn has no Cayley form
    ad.tensors[name]["boft_R"].zero_()
    ad.tensors[name]["boft_R"][0, 0, 0] = 1e4  # one plane turned by 2·atan(1e4) ≈ 179.99°
    with pytest.raises(AdapteditError, match="turns a direction by nearly 180°"):
        export_peft(ad, tmp_path / "h")
    assert not (tmp_path / "h").exists()


def _peft_boft(base, folder, **kw):
    from peft import BOFTConfig, get_peft_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = get_peft_model(resolve(str(base)).load(dtype=torch.float32),
                           BOFTConfig(target_modules=["q_proj", "v_proj", "down_proj"], **kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return peft_logits(base, folder)


@pytest.mark.parametrize("butterflies", [False, True])
def test_import_of_a_peft_folder_gives_peft_logits(tiny_llama, tmp_path, request, butterflies):
    """A PEFT-made BOFT folder (on CPU PEFT makes one factor whatever the config says)."""
    if butterflies:
        request.getfixturevalue("_peft_fbd")
    ref = _peft_boft(tiny_llama, tmp_path / "peft", boft_block_size=4, boft_n_butterfly_factor=2,
                     boft_dropout=0.1)
    ad = load_adapter(tmp_path / "peft")
    assert ad.config.init["butterfly_factors"] == (2 if butterflies else 1)
    got = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    assert (got - logits(resolve(str(tiny_llama)).load())).abs().max() > 1e-2
    assert (got - ref).abs().max() <= 1e-5
    code, out, err = run_cli(["merge", str(tmp_path / "peft"), "-o", str(tmp_path / "m"),
                              "--dtype", "fp32", "--json"])
    assert code == 0 and json.loads(out)["verified"], err
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "bias": "boft_only"}))
    code, _, err = run_cli(["merge", str(tmp_path / "peft"), "-o", str(tmp_path / "m2")])
    assert code == 1 and 'bias="boft_only"' in err and err.count("\n") == 1, err


def test_inspect_reports_the_rotation(tiny_llama, tmp_path):
    """‖M − I‖_F, the angles of M's eigenvalues and ‖MᵀM − I‖ against PEFT's dense M."""
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(**_opts(4, 2))), 4, 0.3)
    ad.save(tmp_path / "ad")
    code, out, err = run_cli(["inspect", str(tmp_path / "ad"), "--json"])
    assert code == 0, err
    recs = {r["name"]: r for r in json.loads(out)["modules"]}
    export_peft(ad, tmp_path / "p")
    from peft import PeftModel

    pm = PeftModel.from_pretrained(resolve(str(tiny_llama)).load(dtype=torch.float32),
                                   tmp_path / "p")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        mat, s = pm.base_model.model.get_submodule(name).get_delta_weight("default")
        mat = mat.double()
        eye = torch.eye(mat.shape[0], dtype=torch.float64)
        rec = recs[name]["method"]
        assert abs(rec["r_minus_i"] - float(torch.linalg.matrix_norm(mat - eye))) <= 1e-5
        assert rec["orthogonality_error"] <= 1e-5
        angles = torch.linalg.eigvals(mat).angle().abs().rad2deg().sort(descending=True).values
        assert abs(rec["angle_max_deg"] - float(angles[0])) <= 1e-4
        assert abs(rec["angle_mean_deg"] - float(angles.mean())) <= 1e-4
        assert rec["scale_min"] == pytest.approx(float(s.min()), abs=1e-7)


def test_train_and_resume_exact(tiny_llama, tmp_path):
    """Three butterfly factors (the contract test resumes the default m = 2)."""
    train_and_resume_exact(tiny_llama, tmp_path, lr=5e-2, **_opts(2, 3))


def test_merge_is_exact_and_verified(tiny_llama, tiny_gpt2, tmp_path):
    merge_matches_adapter(tiny_llama, tmp_path / "l", **_opts(4, 2))
    merge_matches_adapter(tiny_gpt2, tmp_path / "g", method="boft")  # Conv1D with biases
