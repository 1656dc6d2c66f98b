"""PEFT OFT and HRA folders read into adaptedit's oft/hra adapters (the inverse of export).

Each folder is made by PEFT itself on the tiny fixture model, its trainable tensors moved as
training would, saved with save_pretrained; adaptedit's model (attach, and `adaptedit merge`) must
give PEFT's logits within 1e-5 in float32. Configurations PEFT reads but adaptedit cannot compute
exactly are refused in one line naming the config key, exit 1.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import load_merged, logits, run_cli
from orthogonal import peft_logits

from adaptedit.formats import load_adapter
from adaptedit.layer import attach
from adaptedit.models import resolve
from adaptedit.peft_io import export_peft

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def _peft_folder(base, folder, config, scale=0.1, seed=0):
    """A PEFT adapter of ``config`` with its trainable tensors moved by scale·N(0, 1), saved;
    returns PEFT's logits of the saved adapter."""
    from peft import get_peft_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(seed)
    model = get_peft_model(resolve(str(base)).load(dtype=torch.float32), config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    model.save_pretrained(folder)
    return peft_logits(base, folder)


def _configs():
    from peft import HRAConfig, OFTConfig

    return {
        "oft-neumann-default": OFTConfig(oft_block_size=8, target_modules=TARGETS),
        "oft-neumann-3": OFTConfig(oft_block_size=4, num_cayley_neumann_terms=3,
                                   target_modules=TARGETS),
        "oft-exact": OFTConfig(oft_block_size=8, use_cayley_neumann=False,
                               target_modules=r".*\.(q_proj|up_proj|down_proj)"),
        "oft-coft": OFTConfig(oft_block_size=8, use_cayley_neumann=False, coft=True, eps=0.3,
                              target_modules=TARGETS),
        "oft-r-shared": OFTConfig(r=4, oft_block_size=0, use_cayley_neumann=False,
                                  block_share=True, target_modules=TARGETS),
        "oft-adjusted": OFTConfig(oft_block_size=24, use_cayley_neumann=False,
                                  module_dropout=0.1, target_modules=TARGETS),
        "hra": HRAConfig(r=4, target_modules=TARGETS),
        "hra-gs": HRAConfig(r=6, apply_GS=True, target_modules=TARGETS),
        "hra-random-init": HRAConfig(r=2, init_weights=False, target_modules=TARGETS),
    }


@pytest.mark.parametrize("kind", ["oft-neumann-default", "oft-neumann-3", "oft-exact", "oft-coft",
                                  "oft-r-shared", "oft-adjusted", "hra", "hra-gs",
                                  "hra-random-init"])
def test_imported_adapter_gives_peft_logits(tiny_llama, tmp_path, kind):
    config = _configs()[kind]
    ref = _peft_folder(tiny_llama, tmp_path / "peft", config)
    assert (ref - logits(resolve(str(tiny_llama)).load())).abs().max() > 1e-2  # it matters
    ad = load_adapter(tmp_path / "peft")
    assert ad.config.method == kind.split("-")[0] and ad.config.source == "peft"
    got = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    assert (got - ref).abs().max() <= 1e-5, kind


def test_neumann_adapter_is_not_the_exact_cayley(tiny_llama, tmp_path):
    """The imported series is PEFT's, not adaptedit's exact Cayley: the two differ visibly."""
    ref = _peft_folder(tiny_llama, tmp_path / "peft", _configs()["oft-neumann-3"], scale=0.3)
    ad = load_adapter(tmp_path / "peft")
    assert all(int(t["oft_neumann"][0]) == 3 for t in ad.tensors.values())
    for t in ad.tensors.values():
        del t["oft_neumann"]
    exact = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    assert (exact - ref).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["oft-neumann-default", "hra-gs"])
def test_merge_cli_of_a_peft_folder(tiny_llama, tmp_path, kind):
    ref = _peft_folder(tiny_llama, tmp_path / "peft", _configs()[kind])
    code, out, err = run_cli(["merge", str(tmp_path / "peft"), "-o", str(tmp_path / "m"),
                              "--dtype", "fp32", "--json"])
    assert code == 0, err
    assert json.loads(out)["verified"]
    assert (logits(load_merged(tmp_path / "m")) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["oft-neumann-default", "oft-coft", "hra"])
def test_import_then_export_round_trips(tiny_llama, tmp_path, kind):
    """export(import(F)) loads in PEFT with F's logits, and reads back to the same tensors."""
    ref = _peft_folder(tiny_llama, tmp_path / "peft", _configs()[kind])
    ad = load_adapter(tmp_path / "peft")
    export_peft(ad, tmp_path / "again")
    assert (peft_logits(tiny_llama, tmp_path / "again") - ref).abs().max() <= 1e-5
    back = load_adapter(tmp_path / "again")
    for name, ts in ad.tensors.items():
        assert ts.keys() == back.tensors[name].keys()
        for k, v in ts.items():
            assert torch.equal(v, back.tensors[name][k]), (name, k)


def _edit(folder, **fields):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _refused(base, tmp_path, key):
    code, _, err = run_cli(["merge", str(tmp_path / "peft"), "--base", str(base), "-o",
                            str(tmp_path / "m")])
    assert code == 1 and err.count("\n") == 1 and key in err, err
    assert "Traceback" not in err and not (tmp_path / "m").exists()
    return err


def test_refusals_name_the_config_key(tiny_llama, tmp_path):
    from peft import HRAConfig, OFTConfig

    folder = tmp_path / "peft"
    _peft_folder(tiny_llama, folder, OFTConfig(oft_block_size=8, target_modules=TARGETS))
    _edit(folder, peft_version="0.17.1")
    assert "0.18" in _refused(tiny_llama, tmp_path, "peft_version=\"0.17.1\"")
    _edit(folder, peft_version="0.21.0", bias="all")
    _refused(tiny_llama, tmp_path, "bias=\"all\"")
    _edit(folder, bias="none", use_cayley_neumann=False, coft=True, block_share=True)
    _refused(tiny_llama, tmp_path, "block_share=true")
    _edit(folder, coft=False, block_share=False, base_model_name_or_path=str(tmp_path / "gone"))
    _refused(tiny_llama, tmp_path, "base_model_name_or_path")

    _peft_folder(tiny_llama, folder, HRAConfig(r=3, target_modules=TARGETS))
    assert "determinant" in _refused(tiny_llama, tmp_path, "r=3")
    _peft_folder(tiny_llama, folder, OFTConfig(oft_block_size=8, use_cayley_neumann=False,
                                               target_modules=["embed_tokens", "q_proj"]))
    _refused(tiny_llama, tmp_path, "embed_tokens")
