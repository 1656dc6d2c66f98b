"""Target plans from the checkpoint header and config.json, without transformers' modelling code.

Importing transformers and building a model on the meta device costs seconds; init, inspect,
merge, export, extract and modules only read tensors. For the architecture families below the
module tree is known: a :class:`Family` lists each block's Linear/Conv1D modules in the order the
transformers class registers them, which config keys give their biases, and which other matrices
(embeddings, the output head, buffers) a checkpoint of that class holds. :func:`header_targets`
turns the safetensors header into the same :class:`~adaptedit.targets.Target` list, in the same
order, as :func:`adaptedit.targets.adaptable` on the meta model, or returns None when it cannot be
sure (another class, remote code, an unknown matrix, a bias the config does not predict, missing
config keys), and the caller falls back to the meta model. tests/test_families.py checks every
family against the meta model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adaptedit.targets import Target

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_OTHER = (r"model\.embed_tokens\.weight", r"lm_head\.weight")


@dataclass(frozen=True)
class Family:
    blocks: str  # module name of the block list, e.g. "model.layers"
    layers_key: str  # config.json key of the number of blocks
    modules: tuple[str, ...]  # Linear/Conv1D modules of one block, in registration order
    bias: dict  # module → config key (default False) or a constant True/False
    other: tuple[str, ...]  # regexes (full model names) of the non-target matrices it may hold
    prefix: str  # the model class's base_model_prefix
    kind: str = "linear"
    tail: tuple[str, ...] = ()  # modules after the blocks (BERT's pooler)


def _llama_like(attention_bias="attention_bias", mlp_bias=False, attn=_ATTN, mlp=_MLP) -> Family:
    bias = {m: attention_bias for m in attn} | {m: mlp_bias for m in mlp}
    return Family("model.layers", "num_hidden_layers", attn + mlp, bias, _LLAMA_OTHER, "model")


_QWEN2_BIAS = {"self_attn.q_proj": True, "self_attn.k_proj": True, "self_attn.v_proj": True,
               "self_attn.o_proj": False}

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": _llama_like(mlp_bias="mlp_bias"),
    "MistralForCausalLM": _llama_like(attention_bias=False),
    "Qwen2ForCausalLM": Family("model.layers", "num_hidden_layers", _ATTN + _MLP,
                               _QWEN2_BIAS | {m: False for m in _MLP}, _LLAMA_OTHER, "model"),
    "Qwen3ForCausalLM": _llama_like(),
    "GemmaForCausalLM": _llama_like(),
    "Gemma2ForCausalLM": _llama_like(),
    "Phi3ForCausalLM": _llama_like(attention_bias=False,
                                   attn=("self_attn.o_proj", "self_attn.qkv_proj"),
                                   mlp=("mlp.gate_up_proj", "mlp.down_proj")),
    "GPT2LMHeadModel": Family(
        "transformer.h", "n_layer", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        {}, (r"transformer\.wte\.weight", r"transformer\.wpe\.weight", r"lm_head\.weight",
             r"transformer\.h\.\d+\.attn\.(masked_)?bias"), "transformer", kind="conv1d"),
    "BertModel": Family(
        "encoder.layer", "num_hidden_layers",
        ("attention.self.query", "attention.self.key", "attention.self.value",
         "attention.output.dense", "intermediate.dense", "output.dense"),
        {}, (r"embeddings\.(word|position|token_type)_embeddings\.weight",
             r"embeddings\.(position|token_type)_ids"), "bert", tail=("pooler.dense",)),
}
_ALWAYS_BIAS = {"GPT2LMHeadModel", "BertModel"}


def family_of(config: dict) -> Family | None:
    archs = config.get("architectures") or []
    if len(archs) != 1 or "auto_map" in config:
        return None
    return FAMILIES.get(archs[0])


def header_targets(config: dict, keys: list[str], shape_of) -> list[Target] | None:
    """The adaptable targets from ``config`` (config.json as a dict), the checkpoint ``keys`` and
    ``shape_of(key)``; None when this module cannot decide them exactly (use the meta model)."""
    fam = family_of(config)
    n_layers = config.get(fam.layers_key) if fam else None
    if fam is None or not isinstance(n_layers, int) or n_layers < 0:
        return None
    arch = config["architectures"][0]
    keyset = set(keys)
    names = [f"{fam.blocks}.{i}.{m}" for i in range(n_layers) for m in fam.modules] + list(fam.tail)
    found, used = [], set()
    for name in names:
        key = _key(name + ".weight", keyset, fam.prefix)
        if key is None:
            continue  # as the meta path: a module the checkpoint does not store is not a target
        shape = tuple(shape_of(key))
        if len(shape) != 2:
            return None
        bias_key = key[:-len("weight")] + "bias"
        has_bias = bias_key in keyset
        rule = True if arch in _ALWAYS_BIAS else fam.bias.get(name.split(".", 3)[-1], False)
        expected = config.get(rule, False) if isinstance(rule, str) else rule
        if not isinstance(expected, bool) or has_bias != expected:
            return None  # the model would have (or lack) a bias the checkpoint lacks (or has)
        out_f, in_f = (shape[1], shape[0]) if fam.kind == "conv1d" else shape
        found.append(Target(name, fam.kind, int(out_f), int(in_f), key, has_bias))
        used.add(key)
    other = re.compile("|".join(f"(?:{rx})" for rx in fam.other))
    for key in keyset - used:
        if len(shape_of(key)) < 2:
            continue  # norms, biases, scalars: never a Linear weight
        if not any(other.fullmatch(n) for n in _names(key, fam.prefix)):
            return None  # a matrix this family does not explain (another variant): be safe
    return found


def _key(key: str, keys: set[str], prefix: str) -> str | None:
    """The checkpoint key of a module weight, as :func:`adaptedit.targets.adaptable` finds it."""
    if key in keys:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in keys:
        return key[len(prefix) + 1:]
    if f"{prefix}.{key}" in keys:
        return f"{prefix}.{key}"
    return None


def _names(key: str, prefix: str) -> tuple[str, ...]:
    """The model names a checkpoint key can stand for (saved with or without the base prefix)."""
    stripped = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
    return (key, stripped, f"{prefix}.{key}")


def config_shapes(config: dict) -> dict[str, tuple[int, int]] | None:
    """(out, in) of each block module as config.json sizes it (the meta model would build these),
    keyed like ``Family.modules`` (and tail names); None for other families or missing keys.
    init compares them with the stored weights: a checkpoint whose config.json disagrees with its
    tensors builds an adapter no later command (train, merge verification) can use."""
    fam = family_of(config)
    if fam is None:
        return None
    arch = config["architectures"][0]

    def size(*keys, default=None):
        for k in keys:
            v = config.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return default

    if arch == "GPT2LMHeadModel":
        e = size("n_embd")
        inner = size("n_inner", default=4 * e if e else None)
        if not e:
            return None
        return {"attn.c_attn": (3 * e, e), "attn.c_proj": (e, e), "mlp.c_fc": (inner, e),
                "mlp.c_proj": (e, inner)}
    h, i = size("hidden_size"), size("intermediate_size")
    if not h or not i:
        return None
    if arch == "BertModel":
        return {"attention.self.query": (h, h), "attention.self.key": (h, h),
                "attention.self.value": (h, h), "attention.output.dense": (h, h),
                "intermediate.dense": (i, h), "output.dense": (h, i), "pooler.dense": (h, h)}
    n = size("num_attention_heads")
    if not n:
        return None
    kv = size("num_key_value_heads", default=n)
    d = size("head_dim", default=h // n)
    q, k = n * d, kv * d
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (k, h), "self_attn.v_proj": (k, h),
            "self_attn.o_proj": (h, q), "self_attn.qkv_proj": (q + 2 * k, h),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.gate_up_proj": (2 * i, h),
            "mlp.down_proj": (h, i)}
