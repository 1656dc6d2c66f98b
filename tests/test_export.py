"""export to PEFT and import from PEFT: PeftModel on the original base gives the adapter's logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import LORA_FAMILY, logits, make_adapter, run_cli
from safetensors.torch import load_file, save_file

from adaptedit.formats import load_adapter
from adaptedit.layer import attach
from adaptedit.merge import MergeOptions, merge
from adaptedit.models import resolve

def peft_logits(base, folder):
    from peft import PeftModel

    warnings.filterwarnings("ignore")
    model = PeftModel.from_pretrained(resolve(str(base)).load(dtype=torch.float32), folder)
    return logits(model.eval())


@pytest.mark.parametrize("method", LORA_FAMILY)
@pytest.mark.parametrize("dora", [False, True])
def test_export_loads_in_peft_with_same_logits(tiny_llama, tmp_path, method, dora):
    ad_dir = make_adapter(tiny_llama, tmp_path / "ad", method=method, dora=dora,
                          rank_pattern="mlp=2")
    code, _, err = run_cli(["export", str(ad_dir), "--format", "peft", "-o", str(tmp_path / "p"),
                            "-q"])
    assert code == 0, err
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"]
    keys = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    a, b = keys[f"base_model.model.{name}.lora_A.weight"], keys[f"base_model.model.{name}.lora_B.weight"]
    k = 4 if method == "lora" else 8  # rank r, or 2r for the methods with θ₀ terms
    assert a.shape == (k, 32) and b.shape[1] == k
    assert (f"base_model.model.{name}.lora_magnitude_vector" in keys) == dora
    ad = load_adapter(ad_dir)
    ref = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), ad))
    assert (peft_logits(tiny_llama, tmp_path / "p") - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("method,dora", [("lora", False), ("pissa", True), ("delora", False)])
def test_export_gpt2_conv1d(tiny_gpt2, tmp_path, method, dora):
    ad = load_adapter(make_adapter(tiny_gpt2, tmp_path / "ad", method=method, dora=dora))
    code, _, err = run_cli(["export", str(ad.path), "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"]
    ref = logits(attach(resolve(str(tiny_gpt2)).load(dtype=torch.float32), ad))
    assert (peft_logits(tiny_gpt2, tmp_path / "p") - ref).abs().max() <= 1e-5


def test_export_then_import_merges_like_the_original(tiny_llama, tmp_path):
    ad_dir = make_adapter(tiny_llama, tmp_path / "ad", method="pissa", dora=True)
    code, _, err = run_cli(["export", str(ad_dir), "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    imported = load_adapter(tmp_path / "p")
    assert imported.config.source == "peft" and imported.config.dora
    assert all(not m.fingerprint for m in imported.config.modules.values())
    merge([load_adapter(ad_dir)], tmp_path / "m1", opts=MergeOptions(verify=False))
    merge([imported], tmp_path / "m2", base=str(tiny_llama))
    a = load_file(str(tmp_path / "m1" / "model.safetensors"))
    b = load_file(str(tmp_path / "m2" / "model.safetensors"))
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_import_refuses_other_types_and_pickle(tiny_llama, tmp_path):
    ad_dir = make_adapter(tiny_llama, tmp_path / "ad")
    code, _, err = run_cli(["export", str(ad_dir), "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    code, _, err = run_cli(["merge", str(tmp_path / "p"), "--base", str(tiny_llama), "-o",
                            str(tmp_path / "m")])
    assert code == 1 and "IA3" in err and err.count("\n") == 1
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "p" / "adapter_model.safetensors").rename(tmp_path / "p" / "adapter_model.bin")
    code, _, err = run_cli(["merge", str(tmp_path / "p"), "--base", str(tiny_llama), "-o",
                            str(tmp_path / "m")])
    assert code == 1 and "adapter_model.bin" in err and "unpickle" in err
    (tmp_path / "p" / "adapter_model.bin").unlink()
    save_file({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(2, 3)},
              str(tmp_path / "p" / "adapter_model.safetensors"))
    code, _, err = run_cli(["merge", str(tmp_path / "p"), "--base", str(tiny_llama), "-o",
                            str(tmp_path / "m")])
    assert code == 1 and "not a LoRA factor" in err


def test_export_usage(tiny_llama, tmp_path):
    ad_dir = make_adapter(tiny_llama, tmp_path / "ad")
    code, _, err = run_cli(["export", str(ad_dir), "--format", "gguf", "-o", str(tmp_path / "p")])
    assert code == 2 and "--format 'gguf'" in err and "peft" in err
    assert not (tmp_path / "p").exists()
    (tmp_path / "p").mkdir()
    code, _, err = run_cli(["export", str(ad_dir), "-o", str(tmp_path / "p")])
    assert code == 1 and "--force" in err
    code, out, err = run_cli(["export", str(ad_dir), "-o", str(tmp_path / "p"), "--force", "--json"])
    assert code == 0 and json.loads(out)["modules"] == 14


def test_import_refuses_activated_lora(tiny_llama, tmp_path):
    """A PEFT aLoRA (``alora_invocation_tokens``) changes only the tokens from its invocation on:
    PEFT's logits differ from the same factors read as plain LoRA, and PEFT cannot merge it, so
    adaptedit refuses it instead of merging it into every token."""
    from peft import LoraConfig, PeftModel, get_peft_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[20, 33])
    model = get_peft_model(resolve(str(tiny_llama)).load(dtype=torch.float32), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "alora")
    alora = logits(PeftModel.from_pretrained(resolve(str(tiny_llama)).load(dtype=torch.float32),
                                             tmp_path / "alora").eval())
    cfg_path = tmp_path / "alora" / "adapter_config.json"
    raw = json.loads(cfg_path.read_text())
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "adapter_model.safetensors").write_bytes(
        (tmp_path / "alora" / "adapter_model.safetensors").read_bytes())
    (plain_dir / "adapter_config.json").write_text(json.dumps({**raw,
                                                               "alora_invocation_tokens": None}))
    plain = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32),
                          load_adapter(plain_dir)))
    assert (plain - peft_logits(tiny_llama, plain_dir)).abs().max() <= 1e-5
    assert (plain - alora).abs().max() > 1e-2  # reading it as plain LoRA would be wrong
    code, _, err = run_cli(["merge", str(tmp_path / "alora"), "--base", str(tiny_llama), "-o",
                            str(tmp_path / "m"), "-q"])
    assert code == 1 and "alora_invocation_tokens" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_import_gpt2_without_fan_in_fan_out_merges_like_peft(tiny_gpt2, tmp_path):
    """PEFT decides Linear vs Conv1D per module (a false ``fan_in_fan_out`` is overridden, with a
    warning, on GPT-2's Conv1D; the saved flag is whatever the last wrapped module set), so the
    base's module type, not the flag, gives the layout: on the square attn.c_proj a transposed ΔW
    has the right shape and was merged silently with --no-verify."""
    from peft import LoraConfig, PeftModel, get_peft_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = get_peft_model(resolve(str(tiny_gpt2)).load(dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["attn.c_proj"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "fan_in_fan_out": False}))
    peft = PeftModel.from_pretrained(resolve(str(tiny_gpt2)).load(dtype=torch.float32),
                                     tmp_path / "p")
    expect = peft.merge_and_unload().state_dict()
    code, _, err = run_cli(["merge", str(tmp_path / "p"), "--base", str(tiny_gpt2), "-o",
                            str(tmp_path / "m"), "--no-verify", "-q"])
    assert code == 0, err
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert max(float((got[k] - expect[k]).abs().max()) for k in got) <= 1e-6


def test_import_lora_on_untied_lm_head_merges_like_peft(tiny_llama, tmp_path):
    """A PEFT LoRA on the output head of an untied model (not an adaptedit target, but a Linear
    whose weight the checkpoint stores) merges to PEFT's merge_and_unload."""
    from peft import LoraConfig, PeftModel, get_peft_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = get_peft_model(resolve(str(tiny_llama)).load(dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "p", save_embedding_layers=False)
    peft = PeftModel.from_pretrained(resolve(str(tiny_llama)).load(dtype=torch.float32),
                                     tmp_path / "p")
    expect = peft.merge_and_unload().state_dict()
    merge([load_adapter(tmp_path / "p")], tmp_path / "m", base=str(tiny_llama))
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert not torch.equal(got["lm_head.weight"], load_file(
        str(tiny_llama / "model.safetensors"))["lm_head.weight"])
    assert max(float((got[k] - expect[k]).abs().max()) for k in got) <= 1e-6


def test_export_loads_with_auto_peft_model(tiny_llama, tmp_path):
    """AutoPeftModel builds the base from the exported config alone (auto_mapping, as PEFT writes
    without a task type) and gives the adapter's logits."""
    from peft import AutoPeftModel, AutoPeftModelForCausalLM

    ad_dir = make_adapter(tiny_llama, tmp_path / "ad", method="pissa", dora=True)
    code, _, err = run_cli(["export", str(ad_dir), "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    arch = json.loads((tiny_llama / "config.json").read_text())["architectures"][0]
    assert cfg["auto_mapping"] == {"base_model_class": arch, "parent_library": "transformers"}
    ref = logits(attach(resolve(str(tiny_llama)).load(dtype=torch.float32), load_adapter(ad_dir)))
    warnings.filterwarnings("ignore")
    for auto in (AutoPeftModel, AutoPeftModelForCausalLM):
        model = auto.from_pretrained(str(tmp_path / "p"), dtype=torch.float32)
        assert (logits(model.eval()) - ref).abs().max() <= 1e-5, auto.__name__


def test_import_refuses_layer_replication(tiny_llama, tmp_path):
    """PEFT's ``layer_replication`` builds a deeper model from repeated base layers ([[0, 1], [0, 1]]:
    two copies of layer 0), so the adapter's layer 1 is a copy of base layer 0. Read as a plain
    LoRA its factors went onto base layer 1: merged weights off PEFT's merge_and_unload by 0.28.
    It is refused in one line naming the key."""
    from peft import LoraConfig, PeftModel, get_peft_model

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                     layer_replication=[[0, 1], [0, 1]])
    model = get_peft_model(resolve(str(tiny_llama)).load(dtype=torch.float32), cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "p")
    expect = PeftModel.from_pretrained(resolve(str(tiny_llama)).load(dtype=torch.float32),
                                       tmp_path / "p").merge_and_unload().state_dict()
    code, _, err = run_cli(["merge", str(tmp_path / "p"), "--base", str(tiny_llama), "-o",
                            str(tmp_path / "m"), "--no-verify", "-q"])
    if code == 0:  # accepted: it must then give PEFT's weights
        got = load_file(str(tmp_path / "m" / "model.safetensors"))
        assert max(float((got[k] - expect[k]).abs().max()) for k in got) <= 1e-6
    assert code == 1 and "layer_replication" in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()
