"""Target plans from the checkpoint header (adaptedit.families) against the meta model.

For every fixture architecture and a tiny checkpoint of every family the header plan must equal the
plan of adaptedit.targets.adaptable on the transformers model built on the meta device (same names
in the same order, kinds, shapes, checkpoint keys, biases), and init's tensors must be bit-identical
whichever plan it used. Anything the families cannot decide falls back to the meta model.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fixtures
from adaptedit import families
from adaptedit.init import InitOptions, build
from adaptedit.models import resolve
from adaptedit.targets import adaptable

FIXTURES = ["tiny_llama", "tiny_llama_tied", "tiny_llama_sharded", "tiny_gpt2", "tiny_bert"]
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# (config class, model class, extra config): a tiny random checkpoint of each family
FAMILY_CASES = {
    "llama_biases": ("LlamaConfig", "LlamaForCausalLM", {"attention_bias": True, "mlp_bias": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0}),
}


def meta_plan(source):
    return adaptable(source.meta_model(), source.checkpoint.keys())


def header_plan(source):
    ckpt = source.checkpoint
    return families.header_targets(source.config_json, ckpt.keys(), ckpt.shape)


@pytest.mark.parametrize("name", FIXTURES)
def test_header_plan_equals_meta_plan_on_fixtures(name, request):
    source = resolve(str(request.getfixturevalue(name)))
    plan = header_plan(source)
    assert plan is not None, f"{name}: the families should decide this architecture"
    assert plan == meta_plan(source)  # Target is a dataclass: names, kinds, shapes, keys, bias
    assert source.targets == plan and source.plan_source == "header"


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("families")
    out = {}
    for case, (cfg_cls, model_cls, extra) in FAMILY_CASES.items():
        torch.manual_seed(0)
        cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
        model = getattr(transformers, model_cls)(cfg)
        model.save_pretrained(root / case)
        out[case] = root / case
    return out


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_header_plan_equals_meta_plan_per_family(case, family_folders):
    source = resolve(str(family_folders[case]))
    plan = header_plan(source)
    assert plan is not None and plan == meta_plan(source)
    assert any(t.has_bias for t in plan) == (case in ("llama_biases", "qwen2"))


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_undecidable_checkpoints_fall_back_to_the_meta_model(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    # a class the families do not list, remote code, or a config that lacks the layer count
    for i, change in enumerate([{"architectures": ["LlamaForSequenceClassification"]},
                                {"auto_map": {"AutoModel": "x.Y"}}, {"architectures": None}]):
        source = resolve(str(_copy(tiny_llama, tmp_path / f"c{i}", **change)))
        assert header_plan(source) is None
    source = resolve(str(_copy(tiny_llama, tmp_path / "nolayers")))
    cfg = dict(source.config_json)
    del cfg["num_hidden_layers"]
    ckpt = source.checkpoint
    assert families.header_targets(cfg, ckpt.keys(), ckpt.shape) is None
    # a matrix the family does not explain (an extra projection), and a bias the config denies
    for extra in ("model.layers.0.self_attn.extra_proj.weight", "model.layers.0.self_attn.q_proj.bias"):
        folder = _copy(tiny_llama, tmp_path / "_".join(extra.split(".")[-2:]))
        state = load_file(folder / "model.safetensors")
        state[extra] = torch.zeros(32, 32) if extra.endswith("weight") else torch.zeros(32)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        source = resolve(str(folder))
        assert header_plan(source) is None
        assert source.targets == meta_plan(source) and source.plan_source == "model"


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
@pytest.mark.parametrize("method,svd", [("pissa", "randomized"), ("lora", "auto")])
def test_init_is_bit_identical_with_either_plan(name, method, svd, request, monkeypatch):
    folder = str(request.getfixturevalue(name))
    opts = InitOptions(method=method, rank=4, svd=svd, seed=3)
    header = build(resolve(folder), opts)
    monkeypatch.setattr(families, "header_targets", lambda *a: None)
    source = resolve(folder)
    meta = build(source, opts)
    assert source.plan_source == "model"
    assert header.config.to_json() == meta.config.to_json()
    assert list(header.tensors) == list(meta.tensors)
    for n, ts in header.tensors.items():
        assert ts.keys() == meta.tensors[n].keys()
        assert all(torch.equal(v, meta.tensors[n][k]) for k, v in ts.items())


_COMMANDS = """
import sys
from adaptedit.cli import main
b, t, d = sys.argv[1:4]
for argv in (["init", b, "--method", "pissa", "-r", "4", "-o", d + "/ad", "-q"],
             ["modules", b, "--json", "-q"], ["inspect", d + "/ad", "--json", "-q"],
             ["merge", d + "/ad", "--no-verify", "-o", d + "/m", "-q"],
             ["export", d + "/ad", "-o", d + "/peft", "-q"],
             ["extract", "--base", b, "--tuned", t, "-r", "2", "-o", d + "/ex", "-q"],
             ["inspect", "--base", b, "--tuned", t, "--json", "-q"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
    bad = sorted(m for m in sys.modules if m.startswith("transformers.models"))
    assert not bad, (argv[0], bad[:3])
"""


def test_tensor_commands_do_not_import_transformers_models(tiny_llama, tmp_path):
    """init, modules, inspect, merge --no-verify, export and extract on a known family import no
    transformers.models.* module (a fresh process: the test process has imported them)."""
    tuned = fixtures.make_tiny_llama(tmp_path / "tuned", seed=1)
    run = subprocess.run([sys.executable, "-c", _COMMANDS, str(tiny_llama), str(tuned),
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
