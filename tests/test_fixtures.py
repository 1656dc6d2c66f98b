"""The tiny checkpoint fixtures load through the ordinary transformers paths and behave."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import fixtures

CAUSAL = ["tiny_llama", "tiny_llama_tied", "tiny_llama_sharded", "tiny_gpt2"]
TEXT = "Tom has 23 apples. He buys 15 more and gives away 9. How many apples does he have now?"


def _tensor_names(folder):
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_lm_loads_and_gives_finite_logits(name, request):
    folder = request.getfixturevalue(name)
    assert (folder / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.vocab_size == len(tok)
    batch = tok([TEXT, "Write the date 1987-03-05 in words."], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == len(tok)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", CAUSAL)
def test_tokenizer_round_trips_and_has_chat_template(name, request):
    tok = AutoTokenizer.from_pretrained(request.getfixturevalue(name))
    assert 300 <= len(tok) <= 500
    for text in [TEXT, "March 5, 1987", "Héllo wörld 😀 {x: 1}\n\tz"]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok(TEXT)["input_ids"]) < len(TEXT) / 1.5  # merges learned, not bytes only
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert tok.pad_token_id != tok.eos_token_id
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ids.count(tok.eos_token_id) == 2  # special tokens are single ids


def test_bert_loads_with_wordpiece_tokenizer(tiny_bert):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert).eval()
    assert model.config.model_type == "bert" and model.config.hidden_size == 32
    batch = tok(["the quick brown fox", "march 5, 1987"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == tok.cls_token_id
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert out.shape == (*batch["input_ids"].shape, 32) and torch.isfinite(out).all()
    assert tok.decode(tok("the quick brown fox")["input_ids"], skip_special_tokens=True) \
        == "the quick brown fox"


def test_llama_shapes_and_tying(tiny_llama, tiny_llama_tied):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"]) == (32, 2, 4, 2, 64)
    assert cfg["tie_word_embeddings"] is False
    assert "lm_head.weight" in _tensor_names(tiny_llama)
    assert json.loads((tiny_llama_tied / "config.json").read_text())["tie_word_embeddings"]
    assert "lm_head.weight" not in _tensor_names(tiny_llama_tied)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_tied)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gpt2_uses_conv1d(tiny_gpt2):
    from transformers.pytorch_utils import Conv1D

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    assert model.config.n_embd == 32 and model.config.n_layer == 2


def test_sharded_has_index_and_same_weights(tiny_llama, tiny_llama_sharded):
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((tiny_llama_sharded / s).is_file() for s in shards)
    assert not (tiny_llama_sharded / "model.safetensors").exists()
    assert set(index["weight_map"]) == _tensor_names(tiny_llama)
    one = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    many = AutoModelForCausalLM.from_pretrained(tiny_llama_sharded).state_dict()
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)


def test_builders_are_deterministic_and_take_dtype(tmp_path):
    a = fixtures.make_tiny_llama(tmp_path / "a", seed=7)
    b = fixtures.make_tiny_llama(tmp_path / "b", seed=7)
    c = fixtures.make_tiny_llama(tmp_path / "c", seed=8, dtype=torch.bfloat16)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    with safe_open(str(c / "model.safetensors"), "pt") as st:
        w = st.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert w.dtype == torch.bfloat16
    with safe_open(str(a / "model.safetensors"), "pt") as st:
        assert not torch.equal(w.float(), st.get_tensor("model.layers.0.self_attn.q_proj.weight"))
