"""A corpus of bad input (issue 11): every case is refused with one line that names the file or the
option and the fix, a non-zero exit code, the inputs byte-identical afterwards and nothing left
behind. Valid files that were once refused (BOM, long CSV fields) are accepted.

Each case builds its inputs under tmp_path from the session fixtures (tests/fixtures.py) and runs
the CLI in-process (helpers.run_cli).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures
from helpers import make_adapter, run_cli

from adaptedit.data import TokenizedData
from adaptedit.data import load as load_data


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("bad_input") / "ad")


def _copy(adapter: Path, root: Path, *, config=None, tensors=None) -> Path:
    """A copy of the adapter under root/ad, its JSON and tensors edited by the given functions."""
    folder = root / "ad"
    shutil.copytree(adapter, folder)
    if config:
        cfg = json.loads((folder / "adaptedit.json").read_text())
        config(cfg)
        (folder / "adaptedit.json").write_text(json.dumps(cfg))
    if tensors:
        t = load_file(str(folder / "adapter.safetensors"))
        tensors(t)
        save_file(t, str(folder / "adapter.safetensors"))
    return folder


def _first(t: dict, suffix: str) -> str:
    return next(k for k in sorted(t) if k.endswith(suffix))


def _nan(t):
    k = _first(t, ".lora_B")
    t[k] = torch.full_like(t[k], float("nan"))


def _rank5(t):  # lora_B out×5 with lora_A 4×in: "mat1 and mat2 shapes cannot be multiplied"
    k = _first(t, ".lora_B")
    t[k] = torch.zeros(t[k].shape[0], 5)


def _peft(adapter: Path, root: Path, config) -> Path:
    """A PEFT folder holding the adapter's factors, with the given adapter_config.json."""
    folder = root / "peft"
    folder.mkdir()
    t = load_file(str(adapter / "adapter.safetensors"))
    out = {f"base_model.model.{k.rsplit('.', 1)[0]}.{k.rsplit('.', 1)[1]}.weight": v
           for k, v in t.items() if k.endswith((".lora_A", ".lora_B"))}
    save_file(out, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def _peft_config(base) -> dict:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(base)}


def _data(root: Path, name="d.jsonl", text='{"text": "hello world"}\n' * 4) -> Path:
    path = root / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _train(folder, data, *extra):
    return ["train", str(folder), "--data", str(data), "--steps", "1", "--device", "cpu", *extra]


def _remote_code_base(base: Path, root: Path) -> Path:
    """The tiny llama as a model that needs its own code: an auto_map and a model_type
    transformers does not know (the .py files are never needed: nothing runs them)."""
    folder = root / "remote"
    shutil.copytree(base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="tiny-remote", auto_map={
        "AutoConfig": "configuration_tiny.TinyConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _on_remote_base(ad: Path, base: Path, root: Path) -> Path:
    remote = _remote_code_base(base, root)
    return _copy(ad, root, config=lambda c: c.update(base={"ref": str(remote), "path": str(remote),
                                                           "kind": "folder"}))


def _bad_shape_base(base: Path, root: Path) -> Path:
    """config.json says intermediate_size 48; the stored MLP weights are 64 wide."""
    folder = root / "base"
    shutil.copytree(base, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# Each case: (inputs under root) -> (argv, expected exit code, a regex the message must match,
# a regex it must not match). The regex names the file or option the problem is in.
CASES = {
    # adaptedit.json of the wrong shape (item 17)
    "config_method_list": lambda ad, base, root: (
        ["inspect", str(_copy(ad, root, config=lambda c: c.update(method=["lora"])))], 1,
        r"ad/adaptedit\.json: method is \['lora'\], expected a string", None),
    "config_format_version_string": lambda ad, base, root: (
        ["inspect", str(_copy(ad, root, config=lambda c: c.update(format_version="1")))], 1,
        r"adaptedit\.json: format_version is '1', expected an integer", None),
    "config_modules_list": lambda ad, base, root: (
        ["export", str(_copy(ad, root, config=lambda c: c.update(modules=[]))), "-o",
         str(root / "out")], 1, r"adaptedit\.json: modules is \[\], expected an object", None),
    # one validation path for every command that reads an adapter (item 13)
    "export_nan_adapter": lambda ad, base, root: (
        ["export", str(_copy(ad, root, tensors=_nan)), "-o", str(root / "out")], 1,
        r"adapter .*ad: .*lora_B holds NaN or Inf", None),
    "export_rank_mismatch": lambda ad, base, root: (
        ["export", str(_copy(ad, root, tensors=_rank5)), "-o", str(root / "out")], 1,
        r"adapter .*ad: .*lora_B is 32×5 but the module is 32×64 at rank 4", None),
    "merge_rank_mismatch": lambda ad, base, root: (
        ["merge", str(_copy(ad, root, tensors=_rank5)), "-o", str(root / "out")], 1,
        r"adapter .*ad: .*lora_B is 32×5", r"mat1|mat2"),
    "inspect_rank_mismatch": lambda ad, base, root: (
        ["inspect", str(_copy(ad, root, tensors=_rank5))], 1, r"adapter .*ad: .*lora_B is 32×5",
        None),
    # a NaN adapter is not a learning-rate problem (item 18)
    "train_nan_adapter": lambda ad, base, root: (
        _train(_copy(ad, root, tensors=_nan), _data(root)), 1, r"adapter .*ad: .*holds NaN",
        r"--lr"),
    # PEFT configs (item 17)
    "peft_r_string": lambda ad, base, root: (
        ["inspect", str(_peft(ad, root, {**_peft_config(base), "r": "four"}))], 1,
        r"peft/adapter_config\.json: r is 'four', expected a positive integer", None),
    "peft_config_list": lambda ad, base, root: (
        ["inspect", str(_peft(ad, root, [_peft_config(base)]))], 1,
        r"peft/adapter_config\.json: expected a JSON object, got list", None),
    "peft_bad_rank_pattern_regex": lambda ad, base, root: (
        ["export", str(_peft(ad, root, {**_peft_config(base), "rank_pattern": {"(": 4}})), "-o",
         str(root / "out")], 1,
        r"adapter_config\.json: rank_pattern key '\(' is not a valid regular expression",
        r"error: error"),
    # options (item 17)
    "train_seed_huge": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root), "--seed", str(2**70)), 2,
        r"--seed 1180591620717411303424: must be an integer from 0 to", None),
    "init_seed_huge": lambda ad, base, root: (
        ["init", str(base), "-o", str(root / "out"), "--seed", str(2**64)], 2, r"--seed \d+: must",
        None),
    "merge_seed_negative": lambda ad, base, root: (
        ["merge", str(ad), "-o", str(root / "out"), "--seed", "-1"], 2, r"--seed -1: must", None),
    "train_epochs_nan": lambda ad, base, root: (
        ["train", str(_copy(ad, root)), "--data", str(_data(root)), "--epochs", "nan"], 2,
        r"--epochs nan: must be a finite number", None),
    "train_weight_decay_nan": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root), "--weight-decay", "nan"), 2,
        r"--weight-decay nan: must be a finite number", None),
    "train_lr_inf": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root), "--lr", "inf"), 2, r"--lr inf: must be a finite",
        None),
    # TOML values are typed like CLI options (items 16, 17)
    "toml_mask_prompt_string": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root), "--config",
               str(_data(root, "t.toml", 'mask_prompt = "no"\n'))), 2,
        r"--config .*t\.toml: mask_prompt = 'no' must be true or false", None),
    "toml_steps_string": lambda ad, base, root: (
        ["train", str(_copy(ad, root)), "--data", str(_data(root)), "--config",
         str(_data(root, "t.toml", 'steps = "3"\n'))], 2,
        r"--config .*t\.toml: steps = '3' must be an integer", None),
    "toml_lr_bool": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root), "--config",
               str(_data(root, "t.toml", "[train]\nlr = true\n"))), 2,
        r"--config .*t\.toml: lr = True must be a number", None),
    # data files (items 16, 17)
    "json_list_trailing_garbage": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root, "d.json", '[{"text": "hello"}] garbage\n')), 1,
        r"d\.json:1: text after the end of the JSON list \('garbage'\)", None),
    "chat_role_substring_of_template": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root, "c.jsonl", json.dumps({"messages": [
            {"role": "e", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n")), 1,
        r"c\.jsonl:1: messages\[0\]\.role 'e' is neither a standard role", None),
    "csv_header_not_utf8": lambda ad, base, root: (
        _train(_copy(ad, root), _data(root, "d.csv", b"te\xffxt\nhello\n")), 1,
        r"d\.csv:1: the CSV header is not valid UTF-8 \(byte 2\); save the file as UTF-8", None),
    # base tensors against config.json at init (item 14)
    "init_shape_disagrees_with_config": lambda ad, base, root: (
        ["init", str(_bad_shape_base(base, root)), "-o", str(root / "out"), "-t", "q_proj"], 1,
        r"base: weight model\.layers\.0\.mlp\.gate_proj\.weight is stored as 64×32 but "
        r"config\.json makes model\.layers\.0\.mlp\.gate_proj a 48×32 linear layer", r"stack"),
    # models that need their own code (item 12): refused in one line naming the flag
    "init_remote_code_without_flag": lambda ad, base, root: (
        ["init", str(_remote_code_base(base, root)), "-o", str(root / "out")], 1,
        r"remote: this model needs its own Python code \(config\.json has auto_map.*'tiny-remote'"
        r"\); pass --trust-remote-code", None),
    "train_remote_code": lambda ad, base, root: (
        _train(_on_remote_base(ad, base, root), _data(root)), 1,
        r"remote: this model needs its own Python code.*; pass --trust-remote-code if you "
        r"trust it$",
        None),
    "merge_remote_code": lambda ad, base, root: (
        ["merge", str(_on_remote_base(ad, base, root)), "-o", str(root / "out")], 1,
        r"remote: this model needs its own Python code.*; pass --trust-remote-code if you "
        r"trust it$",
        None),
    # misleading hints (item 18)
    "hub_id_dot_dot": lambda ad, base, root: (
        ["init", "a/..", "-o", str(root / "out")], 1,
        r"a/\.\.: no such file or folder, and not a valid hub id", r"cache"),
}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_in_one_line(case, adapter, tiny_llama, tmp_path):
    root = tmp_path / "case"
    root.mkdir()
    argv, code, want, unwanted = CASES[case](adapter, tiny_llama, root)
    before, base_before = _snapshot(root), _snapshot(tiny_llama)
    rc, out, err = run_cli(argv)
    assert rc == code, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(want, lines[0]), lines[0]
    assert not re.search(r"\b\w+(Error|Exception)\b|Traceback|ADAPTEDIT_DEBUG", lines[0]), lines[0]
    if unwanted:
        assert not re.search(unwanted, lines[0]), lines[0]
    assert _snapshot(root) == before  # inputs byte-identical, nothing left behind
    assert _snapshot(tiny_llama) == base_before


def _runnable_remote_base(base: Path, root: Path) -> Path:
    """:func:`_remote_code_base` with its code: a Llama subclass under a model_type of its own."""
    folder = _remote_code_base(base, root)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["TinyForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "configuration_tiny.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass TinyConfig(LlamaConfig):\n"
        "    model_type = 'tiny-remote'\n")
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny import TinyConfig\n"
        "\n\nclass TinyForCausalLM(LlamaForCausalLM):\n    config_class = TinyConfig\n")
    return folder


def test_a_model_with_its_own_code_trains_and_merges_with_the_flag(tiny_llama, tmp_path):
    """--trust-remote-code is taken by every command that loads such a model: init, train, merge
    (whose verification runs the code and whose output carries it: transformers loads the merged
    folder as the model's own class)."""
    import transformers

    remote = _runnable_remote_base(tiny_llama, tmp_path)
    ad, merged = tmp_path / "ad", tmp_path / "m"
    rc, _, err = run_cli(["init", str(remote), "-o", str(ad), "--rank", "2", "--trust-remote-code"])
    assert rc == 0, err
    rc, _, err = run_cli(_train(ad, _data(tmp_path), "--steps", "2", "--trust-remote-code"))
    assert rc == 0, err
    rc, out, err = run_cli(["merge", str(ad), "-o", str(merged), "--json", "--trust-remote-code"])
    assert rc == 0, err
    result = json.loads(out)
    assert result["verified"] and result["max_abs_logit_diff"] <= result["tolerance"]
    for name in ("configuration_tiny.py", "modeling_tiny.py"):
        assert (merged / name).read_bytes() == (remote / name).read_bytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True)
    assert type(model).__name__ == "TinyForCausalLM"
    w = load_file(str(merged / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.data, w)


def test_train_on_a_changed_base_names_the_fix(tiny_llama, tmp_path):
    """The base's weights changed under the adapter: refused in one line naming the fix, with or
    without --base pointing at the changed folder (item 18)."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    folder = make_adapter(base, tmp_path / "ad")
    fixtures.make_tiny_llama(base, seed=1)  # same shapes, other weights, same path
    data = _data(tmp_path)
    before = _snapshot(tmp_path)
    for extra in ([], ["--base", str(base)]):
        rc, _, err = run_cli(_train(folder, data, *extra))
        assert rc == 1 and len(err.strip().splitlines()) == 1, err
        assert "was made for base" in err and "differs" in err, err
        assert "run `adaptedit init` on this one" in err
        assert _snapshot(tmp_path) == before


def test_train_on_a_moved_base_with_base(tiny_llama, tmp_path):
    """train --base: the moved base folder is used, the trained adapter records it, and later
    commands (merge, train again) find it without --base; its tokens match a run on the original."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    folder = make_adapter(base, tmp_path / "ad")
    reference = tmp_path / "ref"
    shutil.copytree(folder, reference)
    data = _data(tmp_path)
    assert run_cli(_train(reference, data, "--steps", "2"))[0] == 0  # on the recorded base
    moved = tmp_path / "moved"
    shutil.move(base, moved)
    rc, _, err = run_cli(_train(folder, data, "--steps", "2", "--base", str(moved)))
    assert rc == 0, err
    config = json.loads((folder / "adaptedit.json").read_text())
    assert config["base"]["path"] == str(moved) and config["base"]["kind"] == "folder"
    ours, ref = load_file(str(folder / "adapter.safetensors")), \
        load_file(str(reference / "adapter.safetensors"))
    assert ours.keys() == ref.keys()
    for k in ours:  # same base weights, data and seed: the same trained tensors
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)
    rc, _, err = run_cli(["merge", str(folder), "-o", str(tmp_path / "m")])
    assert rc == 0, err
    rc, _, err = run_cli(_train(folder, data, "-o", str(tmp_path / "more")))  # no --base
    assert rc == 0, err


# ----------------------------------------------------------------------- valid files accepted


TEXTS = ["hello world", "the quick brown fox"]


@pytest.fixture(scope="module")
def tok():
    return fixtures.make_tokenizer()


def _texts(data: TokenizedData, tok) -> list[str]:
    return [tok.decode(data.example(i)[0].tolist(), skip_special_tokens=True)
            for i in range(len(data))]


@pytest.mark.parametrize("name,content", [
    ("bom.json", b"\xef\xbb\xbf" + json.dumps([{"text": t} for t in TEXTS]).encode()),
    ("bom.jsonl", b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()),
    ("bom.csv", b"\xef\xbb\xbftext\n" + "".join(f"{t}\n" for t in TEXTS).encode()),
])
def test_a_byte_order_mark_is_not_content(name, content, tok, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    data = load_data(path, tok, max_length=64)
    assert _texts(data, tok) == TEXTS
    assert path.read_bytes() == content


def test_a_csv_field_over_128_kib_is_read_whole(tok, tmp_path):
    import csv

    long = "word " * 60_000  # 300 KB in one cell (csv's default limit is 128 KiB)
    path = tmp_path / "long.csv"
    path.write_text(f'prompt,completion\n"{long}",short\nhi,there\n')
    limit = csv.field_size_limit()
    data = load_data(path, tok, max_length=32, mask_prompt=False)
    assert len(data) == 2 and data.stats.truncated == 1
    assert csv.field_size_limit() == limit  # the process-wide limit is restored


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama_tied", "tiny_gpt2", "tiny_bert"])
def test_config_shapes_equal_the_meta_model_on_every_fixture(name, request):
    """families.config_shapes (init's check of stored shapes, item 14) sizes every module as the
    transformers model built from config.json does."""
    from adaptedit.families import config_shapes
    from adaptedit.models import resolve
    from adaptedit.targets import adaptable

    source = resolve(str(request.getfixturevalue(name)))
    sizes = config_shapes(source.config_json)
    targets = adaptable(source.meta_model(), source.checkpoint.keys())
    assert sizes and targets
    for t in targets:
        assert (sizes.get(t.name.split(".", 3)[-1]) or sizes[t.name]) == t.shape, t.name


# a tiny checkpoint of every other family families.config_shapes sizes (as tests/test_families.py)
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {"mistral": ("MistralConfig", "MistralForCausalLM", {}),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
            "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
            "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
            "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0})}


@pytest.mark.parametrize("case", list(FAMILIES))
def test_config_shapes_equal_the_meta_model_per_family(case, tmp_path):
    import transformers

    from adaptedit.families import config_shapes
    from adaptedit.models import resolve
    from adaptedit.targets import adaptable

    cfg_cls, model_cls, extra = FAMILIES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**SMALL, **extra})
    getattr(transformers, model_cls)(cfg).save_pretrained(tmp_path / case)
    source = resolve(str(tmp_path / case))
    sizes = config_shapes(source.config_json)
    targets = adaptable(source.meta_model(), source.checkpoint.keys())
    assert sizes and targets
    for t in targets:
        assert sizes[t.name.split(".", 3)[-1]] == t.shape, t.name


@pytest.mark.parametrize("command", ["eval", "train", "merge"])
def test_a_moved_base_is_named_with_the_fix(command, tiny_llama, tmp_path):
    """The base folder an adapter records is gone: one line naming it and what to do (--base), not
    "no such file or folder" about a bare name."""
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    folder = make_adapter(base, tmp_path / "ad")
    shutil.move(base, tmp_path / "moved")
    data = _data(tmp_path)
    args = {"eval": ["eval", str(folder), "--data", str(data)],
            "train": _train(folder, data),
            "merge": ["merge", str(folder), "-o", str(tmp_path / "m")]}[command]
    before = _snapshot(tmp_path)
    rc, _, err = run_cli(args)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert f"its base model folder {base} (recorded at init) is not there any more" in err
    assert "--base" in err
    assert _snapshot(tmp_path) == before
    rc, _, err = run_cli(args[:2] + ["--base", str(tmp_path / "moved")] + args[2:])
    assert rc == 0, err  # each runs on the given base


@pytest.mark.parametrize("command", ["modules", "init"])
def test_an_adapter_folder_given_as_the_model_is_named(command, adapter, tmp_path):
    """An adapter folder where a model is expected said only 'no config.json'."""
    args = [command, str(adapter)] + (["-o", str(tmp_path / "out")] if command == "init" else [])
    code, _, err = run_cli(args)
    assert code == 1 and err.startswith(f"error: {adapter}: an adapter folder (adaptedit.json), "
                                        "not a model; give a model folder here: its base"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_negative_eval_every_names_its_range(adapter, tmp_path):
    """--eval-every -1 was reported as needing held-out data instead of as out of range."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    code, _, err = run_cli(["train", str(adapter), "--data", str(data), "--eval-every", "-1",
                            "-o", str(tmp_path / "out")])
    assert code == 2 and err.strip() == "error: --eval-every and --save-every must be ≥ 0", err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["models/absent.gguf", "absent.gguf", "org/absent.safetensors"])
def test_a_missing_gguf_path_is_no_such_file_not_a_hub_miss(name, tmp_path, monkeypatch):
    """models/x.gguf that does not exist was looked up on the hub as a repository id."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["modules", name])
    assert code == 1 and err.startswith(f"error: {name}: no such file; check the path"), err
    assert "hub" not in err.split(";")[0] and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("weight_map", [[], {"x": 5}, {"x": "../other/model.safetensors"}])
def test_a_malformed_shard_index_is_named(weight_map, tiny_llama_sharded, tmp_path):
    """weight_map as a list or with a non-string shard gave 'error: AttributeError/TypeError: ...';
    a shard path outside the folder was opened."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_sharded, folder)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    code, _, err = run_cli(["modules", str(folder)])
    assert code == 1 and err.startswith(f"error: {index}: not a valid safetensors index "
                                        "(weight_map must map"), err
    assert len(err.strip().splitlines()) == 1


def test_modules_refuses_a_config_that_disagrees_with_the_weights(tiny_llama, tmp_path):
    """modules listed config.json's 4096×11008 shapes (exit 0) for 32×64 stored weights; init refused."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama, folder)
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    code, out, err = run_cli(["modules", str(folder)])
    assert code == 1 and "is stored as 32×32 but config.json makes" in err, (out, err)
    assert err.startswith("error: ") and "fix config.json" in err and len(err.strip().splitlines()) == 1


def test_dora_as_a_method_points_to_the_flag(tiny_llama, tmp_path):
    """--method dora said only 'unknown method' without naming --dora."""
    code, _, err = run_cli(["init", str(tiny_llama), "--method", "dora", "-o", str(tmp_path / "o")])
    assert code == 2 and err.strip() == ("error: 'dora' is not a method but goes on top of one: "
                                         "--method lora --dora (compare: --methods lora+dora)"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["init", "inspect"])
def test_an_output_under_a_file_says_a_file_is_in_the_way(command, adapter, tiny_llama, tmp_path):
    """-o FILE/x said '(File exists)', naming no file and no fix."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep")
    out = blocker / "x" / "y"
    args = (["init", str(tiny_llama), "-o", str(out)] if command == "init"
            else ["inspect", str(adapter), "--html", str(out / "r.html")])
    code, _, err = run_cli(args)
    assert code == 1 and "(a file stands where a folder of that path should be); choose another" \
        in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "keep"


@pytest.mark.parametrize("args,needle", [
    (["init", "--rank", "abc"], "Invalid value for '--rank'"),
    (["init", "--no-such-flag"], "No such option: --no-such-flag"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["merge", "x"], "Missing option '--out'"),
])
def test_usage_errors_of_the_parser_are_one_line(args, needle, tmp_path):
    """What the option parser rejects (a wrong type, an unknown option or command, a missing
    option) is one `error:` line with exit 2, like every other usage error; help stays help."""
    rc, out, err = run_cli(args)
    assert rc == 2 and err.startswith("error: ") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "--help" in err and out == ""
    rc, out, _ = run_cli(["init", "--help"])
    assert rc == 0 and "Usage" in out
