"""Tiny random checkpoints built on the fly and saved as real folders (config.json +
safetensors + a working tokenizer), so that tests exercise the same loading paths as real
models. Nothing here touches the network.

Builders (all deterministic for a given seed, each well under a second once transformers is
imported):

    make_tokenizer(vocab_size=400)            byte-level BPE + ChatML template (causal LMs)
    make_wordpiece_tokenizer(vocab_size=400)  WordPiece with [CLS]/[SEP] (BERT)
    make_tiny_llama(path, *, tied=False, dtype=torch.float32, seed=0, max_shard_size=None)
    make_tiny_llama_sharded(path, *, tied=False, dtype=torch.float32, seed=0, max_shard_size="60KB")
    make_tiny_gpt2(path, *, dtype=torch.float32, seed=0)
    make_tiny_bert(path, *, dtype=torch.float32, seed=0)
    build_all(root) -> dict[name, Path]

Usable outside pytest too, e.g. ``python tests/fixtures.py /tmp/tiny`` writes every folder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

# A ChatML template in the style of Qwen/SmolLM: every turn is
# "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens an assistant turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# A few hundred words of plain English, close to what the tests and the example tasks feed the
# tokenizer (word problems, dates, chat turns), so that common words become single tokens.
CORPUS = """
The quick brown fox jumps over the lazy dog. A small model learns a new task from a few
examples. Tom has 23 apples. He buys 15 more and gives away 9. How many apples does he have
now? Mary had 41 marbles, found 12 more and lost 7. How many marbles does she have left?
A baker made 36 cakes, baked 20 more and sold 18. How many cakes are there now? Sam reads
14 pages on Monday, 25 pages on Tuesday and skips 6. What is the total? The answer is 29.
Write the date 1987-03-05 in words. March 5, 1987. Write the date 2004-11-23 in words.
November 23, 2004. January, February, March, April, May, June, July, August, September,
October, November, December. Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
The user asks a question and the assistant gives a short answer. The system prompt says:
you are a helpful assistant. Hello, world! What year is it? What month and what day?
An adapter adds a low rank update to the weight matrix of each layer. We train the adapter,
test it on held out data, and merge it back into the model. The rank, the scale and the
learning rate are chosen before training starts. Singular values of the matrix tell us how
much each direction matters. One, two, three, four, five, six, seven, eight, nine, ten,
eleven, twelve, twenty, thirty, forty, fifty, sixty, seventy, eighty, ninety, hundred.
Plus, minus, equals, total, left, right, more, less, each, every, some, many, few, all.
She walked to the market in the morning and came back in the evening with bread, milk,
eggs, oranges and books. They counted the coins on the table: 10, 20, 30, 40, 50, 60, 70.
This is a test. That was a train. Which value is larger, 48 or 84? It is not always easy
to say, but it is often simple to check. 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19
100 200 300 1900 1950 1999 2000 2010 2023 2024 2025. Please answer with a single number.
"""

# Kept for backward compatibility with earlier versions of this module.
_WORDS = CORPUS.split()


def _corpus_lines() -> list[str]:
    lines = [ln.strip() for ln in CORPUS.strip().splitlines() if ln.strip()]
    return lines * 4  # repetition makes frequent pairs win merges; cheap at this size


@functools.lru_cache(maxsize=None)
def _bpe_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process; builders copy it from its JSON."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def _wordpiece_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS,
                                        show_progress=False)
    tok.train_from_iterator(_corpus_lines(), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok.to_str()


def make_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (lossless round trip of any text) with ChatML special tokens:
    bos <|im_start|>, eos <|im_end|>, pad <pad>, and the CHATML chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json(vocab_size)),
                                   bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<|endoftext|>",
                                   model_max_length=256)
    fast.chat_template = CHATML
    return fast


def make_wordpiece_tokenizer(vocab_size: int = 400):
    """A lowercasing WordPiece tokenizer in the style of BERT ([CLS] text [SEP])."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_wordpiece_json(vocab_size)),
                                   unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)


def _save(model, tok, path: Path, **save_kw) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kw)
    tok.save_pretrained(path)
    return path


def make_tiny_llama(path: Path, *, tied: bool = False, dtype: torch.dtype = torch.float32,
                    seed: int = 0, max_shard_size: str | int | None = None) -> Path:
    """LlamaForCausalLM: hidden 32, 2 layers, 4 heads / 2 kv heads (GQA), intermediate 64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=tied,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    return _save(model, tok, path, **kw)


def make_tiny_llama_sharded(path: Path, *, tied: bool = False,
                            dtype: torch.dtype = torch.float32, seed: int = 0,
                            max_shard_size: str | int = "60KB") -> Path:
    """The tiny llama saved as >= 2 safetensors shards + model.safetensors.index.json
    (same weights as make_tiny_llama with the same seed)."""
    path = make_tiny_llama(path, tied=tied, dtype=dtype, seed=seed, max_shard_size=max_shard_size)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2, "max_shard_size too large for 2 shards"
    return path


def make_tiny_gpt2(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """GPT2LMHeadModel (Conv1D layers, tied lm_head): n_embd 32, 2 layers, 4 heads."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    return _save(GPT2LMHeadModel(cfg).to(dtype).eval(), tok, path)


def make_tiny_bert(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """BertModel (encoder, no head): hidden 32, 2 layers, 4 heads, WordPiece tokenizer."""
    from transformers import BertConfig, BertModel

    tok = make_wordpiece_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                     pad_token_id=tok.pad_token_id)
    return _save(BertModel(cfg).to(dtype).eval(), tok, path)


def make_synthetic_llama(path: Path, *, hidden: int = 256, intermediate: int = 512, layers: int = 1,
                         vocab: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                         spectrum=None, dtype: torch.dtype = torch.float32) -> Path:
    """A LlamaForCausalLM checkpoint written from its tensors (config.json + model.safetensors, no
    tokenizer, no transformers model): wider than tiny_llama, for the SVD paths that need
    min(out, in) in the hundreds. Weights are Gaussian / sqrt(in), or U diag(spectrum(m)) Vᵀ with
    random orthonormal U, V when ``spectrum`` (a function of m = min(out, in)) is given."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    hd = hidden // heads
    shapes = {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv_heads * hd, hidden),
              "self_attn.v_proj": (kv_heads * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}

    def weight(out_f, in_f):
        if spectrum is None:
            return torch.randn(out_f, in_f, generator=g) / in_f ** 0.5
        m = min(out_f, in_f)
        u = torch.linalg.qr(torch.randn(out_f, m, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(in_f, m, generator=g, dtype=torch.float64)).Q
        return ((u * torch.as_tensor(spectrum(m), dtype=torch.float64)) @ v.T).float()

    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
             "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        for name, shape in shapes.items():
            state[f"model.layers.{i}.{name}.weight"] = weight(*shape)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


BUILDERS = {
    "tiny_llama": make_tiny_llama,
    "tiny_llama_tied": functools.partial(make_tiny_llama, tied=True),
    "tiny_llama_sharded": make_tiny_llama_sharded,
    "tiny_gpt2": make_tiny_gpt2,
    "tiny_bert": make_tiny_bert,
}


def build_all(root: Path) -> dict[str, Path]:
    """Write every tiny checkpoint under ROOT/<name>; returns {name: folder}."""
    root = Path(root)
    return {name: build(root / name) for name, build in BUILDERS.items()}


if __name__ == "__main__":
    import sys
    import time

    t0 = time.perf_counter()
    for name, folder in build_all(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny")).items():
        print(f"{name:20s} {folder}")
    print(f"built in {time.perf_counter() - t0:.2f}s")
