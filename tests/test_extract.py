"""extract: the truncated SVD of W_tuned − W_base as a native LoRA adapter of the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

from adaptedit.formats import load_adapter
from adaptedit.merge import MergeOptions, merge
from adaptedit.models import resolve
from adaptedit.targets import adaptable


def make_tuned(base: Path, out: Path, *, rank: int | None = None, seed: int = 0) -> Path:
    """A 'fine-tune' of ``base``: every target weight moved (by a rank-``rank`` or dense update)."""
    shutil.copytree(base, out)
    src = resolve(str(base))
    state = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for t in adaptable(src.meta_model(), state.keys()):
        w = state[t.key]
        if rank is None:
            d = 0.02 * torch.randn(w.shape, generator=g)
        else:
            d = 0.1 * torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1],
                                                                                generator=g)
        state[t.key] = (w.float() + d).to(w.dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_full_rank_reproduces_the_finetune(tiny_llama, tmp_path):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned")
    code, out, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tuned), "--rank",
                              "64", "-o", str(tmp_path / "ad"), "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert all(m["rel_error"] < 1e-5 for m in report["modules"])
    ad = load_adapter(tmp_path / "ad")
    assert ad.config.method == "lora" and all(m.scaling == 1.0 for m in ad.config.modules.values())
    merge([ad], tmp_path / "m", opts=MergeOptions(verify=False))
    a = load_file(str(tuned / "model.safetensors"))
    b = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_low_rank_update_recovered_and_energy(tiny_llama, tmp_path):
    tuned = make_tuned(tiny_llama, tmp_path / "tuned", rank=2, seed=1)
    code, out, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tuned), "--rank",
                              "2", "-o", str(tmp_path / "r2"), "--json"])
    assert code == 0, err
    assert all(m["rel_error"] < 1e-5 and m["rank"] == 2 for m in json.loads(out)["modules"])
    code, out, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tuned),
                              "--energy", "0.9", "--targets", "q_proj,o_proj", "-o",
                              str(tmp_path / "e"), "--json"])
    assert code == 0, err
    mods = json.loads(out)["modules"]
    assert len(mods) == 4 and all(m["energy"] >= 0.9 and m["rank"] <= 2 for m in mods)
    ad = load_adapter(tmp_path / "e")
    assert ad.config.base["ref"] == str(tiny_llama)
    # fingerprints are those of the base: the adapter applies to the base, not the fine-tune
    code, _, err = run_cli(["merge", str(tmp_path / "e"), "--base", str(tuned), "-o",
                            str(tmp_path / "m")])
    assert code == 1 and "made for base" in err


def test_extract_errors(tiny_llama, tiny_llama_tied, tiny_gpt2, tmp_path):
    code, _, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tiny_gpt2),
                            "--rank", "2", "-o", str(tmp_path / "x")])
    assert code == 1 and "GPT2LMHeadModel" in err
    code, _, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tiny_llama_tied),
                            "--rank", "2", "-o", str(tmp_path / "x")])
    assert code == 1 and "lm_head.weight" in err
    code, _, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tiny_llama),
                            "-o", str(tmp_path / "x")])
    assert code == 2 and "exactly one of --rank R or --energy E" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tiny_llama),
                            "--energy", "1.5", "-o", str(tmp_path / "x")])
    assert code == 2 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("rank", [2])
def test_identical_checkpoints_give_zero_update(tiny_llama, tmp_path, rank):
    code, out, err = run_cli(["extract", "--base", str(tiny_llama), "--tuned", str(tiny_llama),
                              "--rank", str(rank), "-o", str(tmp_path / "z"), "--json"])
    assert code == 0, err
    assert all(m["rel_error"] == 0.0 for m in json.loads(out)["modules"])


def test_hub_style_gpt2_base_and_transformers_saved_tune(tiny_gpt2, tmp_path):
    """The hub's GPT-2 stores its keys without ``transformer.`` (h.0.*), a fine-tune saved by
    transformers with it; transformers loads both, and extract / inspect --tuned now pair the
    tensors (before: refused, 'tensor h.0.attn.c_attn.bias ... is missing from --tuned'). The
    rank-2 update is recovered exactly: PEFT's model of the exported adapter gives the tuned
    model's logits."""
    import warnings

    import transformers as T
    from peft import PeftModel

    warnings.filterwarnings("ignore")
    base = tmp_path / "gpt2"
    shutil.copytree(tiny_gpt2, base)
    sd = load_file(str(base / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in sd.items()},
              str(base / "model.safetensors"), metadata={"format": "pt"})
    tuned = T.GPT2LMHeadModel.from_pretrained(base).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in tuned.transformer.h:
            w = block.attn.c_attn.weight  # Conv1D: in × out
            w.add_(0.05 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1],
                                                                                generator=g))
    tuned.save_pretrained(tmp_path / "tuned")
    code, _, err = run_cli(["extract", "--base", str(base), "--tuned", str(tmp_path / "tuned"),
                            "-r", "2", "-o", str(tmp_path / "ex"), "-q"])
    assert code == 0, err
    code, _, err = run_cli(["export", str(tmp_path / "ex"), "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])
    peft = PeftModel.from_pretrained(T.GPT2LMHeadModel.from_pretrained(base), tmp_path / "p")
    with torch.no_grad():
        got, ref = peft.eval()(input_ids=ids).logits, tuned(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4
    code, _, err = run_cli(["inspect", "--base", str(base), "--tuned", str(tmp_path / "tuned"),
                            "--json", "-q"])
    assert code == 0, err
