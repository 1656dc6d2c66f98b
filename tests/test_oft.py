"""OFT: block-diagonal Cayley rotation of the input space (adaptedit/methods/oft.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import init_is_identity, perturb, run_cli
from orthogonal import export_matches_peft, merge_matches_adapter

from adaptedit.errors import AdapteditError, UsageError
from adaptedit.init import InitOptions, build
from adaptedit.analysis import inspect_adapters
from adaptedit.methods import oft
from adaptedit.models import resolve
from adaptedit.targets import Target


def _targets(*ins):
    return [Target(f"m{i}", "linear", 8, n, f"m{i}.weight", False) for i, n in enumerate(ins)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dora", [False, True])
def test_init_is_the_base_bit_for_bit(tiny_llama, tiny_gpt2, dtype, dora):
    init_is_identity(tiny_llama, dtype, method="oft", dora=dora)
    init_is_identity(tiny_llama, dtype, method="oft", dora=dora, options={"block_size": 4,
                                                                         "coft_eps": 1e-3})
    init_is_identity(tiny_gpt2, dtype, method="oft", dora=dora)  # GPT-2's Conv1D


def test_rotation_is_the_exact_cayley_transform(tiny_llama):
    """R_k = (I − Q_k)(I + Q_k)⁻¹ against a float64 reference; RᵀR = I; W' = W·blockdiag(R)ᵀ."""
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(method="oft",
                                                             options={"block_size": 8})), 2, 0.3)
    name = "model.layers.0.mlp.down_proj"  # 64 inputs: 8 blocks of 8
    info, t = ad.config.modules[name], ad.tensors[name]
    r = oft.rotation(t, info).double()
    q = t["oft_R"].double()
    assert info.rank == 8 and q.shape == (8, 28)
    eye = torch.eye(8, dtype=torch.float64)
    for k in range(8):
        s = torch.zeros(8, 8, dtype=torch.float64)
        s[tuple(torch.triu_indices(8, 8, 1))] = q[k]
        s = s - s.T
        ref = (eye - s) @ torch.linalg.inv(eye + s)
        assert (r[k] - ref).abs().max() <= 1e-6
        assert (r[k].T @ r[k] - eye).abs().max() <= 1e-6
    w = resolve(str(tiny_llama)).checkpoint.get(info.key).double()
    expect = w @ torch.block_diag(*r).T
    assert (ad.merged(name, w.float()).double() - expect).abs().max() <= 1e-5


def test_default_block_size_is_the_largest_that_fits_every_module():
    assert oft.plan(_targets(64, 96), {}, {"block_size": None}, False)[1]["block_size"] == 32
    ranks, opts = oft.plan(_targets(64, 48), {}, {"block_size": None}, False)
    assert opts["block_size"] == 16 and ranks == {"m0": 4, "m1": 3}
    with pytest.raises(AdapteditError, match=r"--block-size 32 does not divide the 48 inputs of m1"):
        oft.plan(_targets(64, 48), {}, {"block_size": 32}, False)
    with pytest.raises(AdapteditError, match="no block size ≥ 2"):
        oft.plan(_targets(64, 33), {}, {"block_size": None}, False)
    with pytest.raises(UsageError, match="--block-size and --rank"):
        oft.plan(_targets(64), {"m0": 4}, {"block_size": 8}, True)
    assert oft.plan(_targets(64, 32), {"m0": 4, "m1": 4}, {"block_size": None}, True)[0] == \
        {"m0": 4, "m1": 4}  # --rank n: n blocks per module (PEFT's r)


def test_cli_refuses_what_does_not_apply(tiny_llama, tmp_path):
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "oft", "--block-size", "24", "-o",
                            str(tmp_path / "a")])
    assert code != 0 and "--block-size 24 does not divide the 32 inputs of model.layers.0" in err
    assert not (tmp_path / "a").exists()
    for args, what in ((["--alpha", "4"], "--alpha does not apply to oft"),
                       (["--rslora"], "--rslora does not apply to oft")):
        code, _, err = run_cli(["init", str(tiny_llama), "-m", "oft", *args, "-o",
                                str(tmp_path / "b")])
        assert code == 2 and what in err, err
    code, _, err = run_cli(["init", str(tiny_llama), "-m", "lora", "--block-size", "8", "-o",
                            str(tmp_path / "c")])
    assert code == 2 and "--block-size applies to oft, boft, not lora" in err, err
    code, out, err = run_cli(["init", str(tiny_llama), "-m", "oft", "--json", "-o",
                              str(tmp_path / "d")])
    assert code == 0, err
    cfg = json.loads((tmp_path / "d" / "adaptedit.json").read_text())
    assert cfg["init"]["block_size"] == 32 and cfg["method"] == "oft"
    # 14 modules; trainable per module: (in / 32) blocks × 32·31/2
    ins = [m["shape"][1] for m in cfg["modules"].values()]
    assert json.loads(out)["trainable_parameters"] == sum(n // 32 * 496 for n in ins)


def test_export_gives_peft_logits(tiny_llama, tmp_path):
    cfg = export_matches_peft(tiny_llama, tmp_path, method="oft", options={"block_size": 8})
    assert cfg["peft_type"] == "OFT" and cfg["oft_block_size"] == 8 and cfg["r"] == 0
    assert cfg["use_cayley_neumann"] is False and cfg["coft"] is False


def test_coft_bounds_each_block_and_exports_exactly(tiny_llama, tmp_path):
    eps = 0.5
    ad = perturb(build(resolve(str(tiny_llama)), InitOptions(
        method="oft", options={"block_size": 8, "coft_eps": eps})), 1, 0.5)
    for name, info in ad.config.modules.items():
        s = oft.skew(ad.tensors[name]["oft_R"], 8)
        bound = eps / math.sqrt(info.rank)
        r = oft.rotation(ad.tensors[name], info).double()
        q = torch.linalg.solve(torch.eye(8, dtype=r.dtype) + r, torch.eye(8, dtype=r.dtype) - r)
        assert torch.linalg.matrix_norm(s).min() > bound  # the raw q is outside the ball ...
        assert torch.linalg.matrix_norm(q).max() <= bound * (1 + 1e-5)  # ... R uses its projection
    cfg = export_matches_peft(tiny_llama, tmp_path, scale=0.5, method="oft",
                              options={"block_size": 8, "coft_eps": eps})
    assert cfg["coft"] is True and cfg["eps"] == eps


def test_neumann_rotation_is_computed_as_peft_does():
    from peft.tuners.oft.layer import OFTRotationModule

    torch.manual_seed(0)
    q = 0.2 * torch.randn(3, 6)  # blocks of 4
    info = type("I", (), {"rank": 3, "shape": [8, 12]})()
    for terms in (2, 3, 5, 7):
        mod = OFTRotationModule(3, 6, 4, 12, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
        ref = mod._cayley_batch(q, 4, True, terms)
        got = oft.rotation({"oft_R": q, "oft_neumann": torch.tensor([terms])}, info)
        assert (got - ref).abs().max() <= 1e-6, terms


def test_export_refusals(tiny_llama, tiny_gpt2, tmp_path):
    from adaptedit.peft_io import export_peft

    ad = build(resolve(str(tiny_gpt2)), InitOptions(method="oft"))
    with pytest.raises(AdapteditError, match="PEFT's OFT does not wrap GPT-2's Conv1D"):
        export_peft(ad, tmp_path / "g")
    ad = build(resolve(str(tiny_llama)), InitOptions(method="oft", dora=True))
    with pytest.raises(AdapteditError, match="oft\\+dora has no exact PEFT form: PEFT's OFT has no"
                                             " DoRA variant"):
        export_peft(ad, tmp_path / "d")
    assert not (tmp_path / "g").exists() and not (tmp_path / "d").exists()


def test_inspect_reports_rotation_angles(tiny_llama, tmp_path):
    """Blocks of 2 with q = a rotate by exactly 2·atan(a) (Cayley of [[0, a], [−a, 0]])."""
    ad = build(resolve(str(tiny_llama)), InitOptions(method="oft", options={"block_size": 2}))
    for t in ad.tensors.values():
        t["oft_R"] = torch.full_like(t["oft_R"], 0.1)
    ad.save(tmp_path / "ad")
    rep = inspect_adapters([tmp_path / "ad"])
    angle = math.degrees(2 * math.atan(0.1))
    for rec in rep["modules"]:
        m = rec["method"]
        assert abs(m["angle_max_deg"] - angle) <= 1e-6 and abs(m["angle_mean_deg"] - angle) <= 1e-6
        n = rec["shape"][1] // 2
        assert abs(m["r_minus_i"] - math.sqrt(n * 2 * (2 - 2 * math.cos(math.radians(angle))))) \
            <= 1e-6
        assert m["orthogonality_error"] <= 1e-6
        assert rec["fro"] > 0 and not rec["zero"]


@pytest.mark.parametrize("dora", [False, True])
def test_merge_is_exact_and_verified(tiny_llama, tiny_gpt2, tmp_path, dora):
    merge_matches_adapter(tiny_llama, tmp_path / "l", method="oft", dora=dora,
                          options={"block_size": 8})
    merge_matches_adapter(tiny_gpt2, tmp_path / "g", method="oft", dora=dora)
