"""PEFT adapters saved with an init that rewrites the base (issue 10, item 1).

PEFT's ``init_lora_weights`` = pissa / pissa_niter_K / olora set W ← W − s·B₀A₀ when the adapter is
built *and again when it is loaded*; the saved factors mean ΔW = s(BA − B₀A₀) on the original base.
adaptedit refuses such a folder (one line naming init_lora_weights and the fix) instead of reading
it as plain LoRA, and the folder PEFT writes with the fix (``path_initial_model_for_weight_conversion``)
merges to exactly what PEFT's own load + merge_and_unload gives on the original base (fp32, 2e-6).
"""

import warnings

import pytest
import torch
from helpers import run_cli

from adaptedit.formats import load_adapter
from adaptedit.errors import AdapteditError
from adaptedit.merge import merge
from adaptedit.models import resolve


def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _trained_peft(base, root, init):
    """A PEFT adapter made with ``init_lora_weights=init``, 'trained' (factors moved), saved
    as-is (root/asis) and converted (root/conv)."""
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(5)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     init_lora_weights=init)
    model = get_peft_model(resolve(str(base)).load(dtype=torch.float32), cfg)
    model.save_pretrained(root / "init")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "asis")
    model.save_pretrained(root / "conv", path_initial_model_for_weight_conversion=str(root / "init"))
    return root / "asis", root / "conv", model.merge_and_unload().state_dict()


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_base_rewriting_init_refused_and_converted_folder_matches_peft(tiny_llama, tmp_path, init):
    from peft import PeftModel

    asis, conv, trained = _trained_peft(tiny_llama, tmp_path, init)
    with pytest.raises(AdapteditError, match="init_lora_weights"):
        load_adapter(asis)
    code, out, err = run_cli(["merge", str(asis), "--base", str(tiny_llama), "-o",
                              str(tmp_path / "bad"), "--no-verify", "-q"])
    assert code == 1 and "init_lora_weights" in err and "path_initial_model_for_weight_conversion" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

    merge([load_adapter(conv)], tmp_path / "m", base=str(tiny_llama))
    got = _tensors(tmp_path / "m")
    # the trained PEFT model merged in memory (its rewritten base + s·BA)
    assert max((got[k] - trained[k]).abs().max().item() for k in got) < 2e-6
    if init != "pissa_niter_2":  # deterministic: PEFT's own reload of the as-is folder agrees
        pm = PeftModel.from_pretrained(resolve(str(tiny_llama)).load(dtype=torch.float32), asis)
        expect = pm.merge_and_unload().state_dict()
        assert max((got[k] - expect[k]).abs().max().item() for k in got) < 2e-6


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva"])
def test_inits_that_keep_the_base_still_import(tiny_llama, tmp_path, init):
    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    cfg = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init)
    model = get_peft_model(resolve(str(tiny_llama)).load(dtype=torch.float32), cfg)
    model.save_pretrained(tmp_path / "a")
    assert load_adapter(tmp_path / "a").config.method == "lora"


@pytest.mark.parametrize("init", ["corda", "loftq", "lora_ga", "LoRA_GA"])
def test_inits_that_need_data_or_quantisation_refused(tiny_llama, tmp_path, init):
    """CorDA, LoftQ and LoRA-GA rewrite the base from calibration data, a quantiser or gradients
    (PEFT's lora_ga_init: W ← W − s·B₀A₀): nothing to recompute them from, so refused by name."""
    import json

    from peft import LoraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    model = get_peft_model(resolve(str(tiny_llama)).load(dtype=torch.float32),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_lora_weights"] = init
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapteditError, match=f"init_lora_weights={init!r}"):
        load_adapter(tmp_path / "a")
