"""Data safety (issue 11 items 1-9): no NaN/Inf written and called verified, no input destroyed
whatever the flags, no overwrite without --force (even of something created meanwhile), one
writer per adapter folder, no pickle loaded, modes from the umask, no writing through links.

Every case asserts the exit code, the one-line message, that the inputs are byte-identical
afterwards and that nothing is left behind."""

import json
import math
import os
import random
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptedit.formats import load_adapter
from adaptedit.errors import AdapteditError

from helpers import make_adapter, run_cli


def snapshot(*paths) -> dict:
    """{path: bytes (files) / None (folders)} of everything under the given paths, links as such."""
    out = {}
    for p in map(Path, paths):
        items = [p] + (sorted(p.rglob("*")) if p.is_dir() and not p.is_symlink() else [])
        for q in items:
            if q.is_symlink():
                out[str(q)] = ("link", os.readlink(q))
            elif q.is_dir():
                out[str(q)] = None
            else:
                out[str(q)] = q.read_bytes()
    return out


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture
def base(tiny_llama, tmp_path):
    """A private copy of the tiny llama (tests may try to destroy it)."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "base"))


@pytest.fixture
def adapter(base, tmp_path):
    return make_adapter(base, tmp_path / "ad", method="lora", rank=4)


def chat_file(path: Path, n: int = 8) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------ 1. NaN / Inf in merges


def _scale_module(folder: Path, module: str, factor: float) -> None:
    ts = load_file(str(folder / "adapter.safetensors"))
    ts[f"{module}.lora_B"] = ts[f"{module}.lora_B"] * factor
    save_file(ts, str(folder / "adapter.safetensors"), metadata={"format": "pt"})


def test_fp16_overflow_is_refused_naming_the_tensor(base, adapter, tmp_path):
    module = "model.layers.0.mlp.down_proj"
    _scale_module(adapter, module, 1e7)
    before = snapshot(base, adapter)
    code, _, err = run_cli(["merge", str(adapter), "--dtype", "fp16", "-o", str(tmp_path / "m")])
    line = one_line(err)
    assert code == 1, err
    assert f"{module}.weight" in line and "beyond the largest float16 (65504)" in line, line
    assert "--dtype bf16 or fp32" in line
    # the value named is the float32 merged weight's largest entry (independent computation)
    ad = load_adapter(adapter)
    w = load_file(str(base / "model.safetensors"))[f"{module}.weight"].float()
    big = float((w + ad.delta_w(module, w)).abs().max())
    assert big > 65504 and f"reaches {big:.6g}" in line, (big, line)
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []
    assert snapshot(base, adapter) == before


def test_nan_scaling_in_adaptedit_json_is_refused(adapter, tmp_path):
    cfg = json.loads((adapter / "adaptedit.json").read_text())
    module = next(iter(cfg["modules"]))
    cfg["modules"][module]["scaling"] = float("nan")
    (adapter / "adaptedit.json").write_text(json.dumps(cfg))  # json writes NaN
    before = snapshot(adapter)
    code, _, err = run_cli(["merge", str(adapter), "-o", str(tmp_path / "m")])
    assert code == 1
    line = one_line(err)
    assert f"modules.{module}.scaling is nan, expected a finite number" in line, line
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []
    assert snapshot(adapter) == before


def test_nan_lora_alpha_in_peft_config_is_refused(base, adapter, tmp_path):
    code, _, err = run_cli(["export", str(adapter), "-o", str(tmp_path / "p"), "-q"])
    assert code == 0, err
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float("nan")
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["merge", str(tmp_path / "p"), "--base", str(base), "-o",
                            str(tmp_path / "m")])
    assert code == 1
    line = one_line(err)
    assert "adapter_config.json" in line and "lora_alpha" in line and "finite number" in line, line
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def _poison_untargeted(base: Path, key: str = "model.norm.weight") -> str:
    ts = load_file(str(base / "model.safetensors"))
    ts[key] = ts[key].clone()
    ts[key][0] = float("inf")
    save_file(ts, str(base / "model.safetensors"), metadata={"format": "pt"})
    return key


def test_base_with_inf_in_an_untargeted_tensor_is_refused(tiny_llama, base, tmp_path):
    # the adapter is made on the clean base: its targeted weights (fingerprints) are unchanged
    ad = make_adapter(tiny_llama, tmp_path / "ad2", method="lora", rank=4)
    key = _poison_untargeted(base)
    before = snapshot(base, ad)
    code, _, err = run_cli(["merge", str(ad), "--base", str(base), "-o", str(tmp_path / "m")])
    assert code == 1
    line = one_line(err)
    assert f"tensor {key} has NaN or Inf" in line, line
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []
    assert snapshot(base, ad) == before


def test_verification_fails_on_non_finite_logits(tiny_llama, base, tmp_path, monkeypatch):
    """With the tensor check bypassed (as a bug would), verification alone must still refuse:
    max(0.0, nan) is 0.0 and a tolerance scaled by an infinite logit is infinite."""
    from adaptedit import merge as M

    ad = make_adapter(tiny_llama, tmp_path / "ad2", method="lora", rank=4)
    _poison_untargeted(base)
    monkeypatch.setattr(M, "check_finite", lambda *a, **k: None)
    code, _, err = run_cli(["merge", str(ad), "--base", str(base), "-o", str(tmp_path / "m")])
    assert code == 1
    line = one_line(err)
    assert line.startswith("error: verification failed") and "NaN or Inf logits" in line, line
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- 2. an output is never an input


def _refused(args, inputs, tmp_path, how):
    before = snapshot(*inputs)
    code, _, err = run_cli(args)
    assert code == 1, err
    line = one_line(err)
    assert f": {how} the input" in line and "never writes over its inputs" in line, line
    assert snapshot(*inputs) == before
    assert leftovers(tmp_path) == []
    return line


def test_merge_onto_its_adapter_or_base_is_refused_even_with_force(base, adapter, tmp_path):
    _refused(["merge", str(adapter), "-o", str(adapter), "--force"], [base, adapter], tmp_path, "is")
    _refused(["merge", str(adapter), "--base", str(base), "-o", str(base), "--force"],
             [base, adapter], tmp_path, "is")
    # the base recorded in the adapter (no --base) is an input too
    _refused(["merge", str(adapter), "-o", str(base), "--force"], [base, adapter], tmp_path, "is")
    # inside an input, and a folder holding an input
    _refused(["merge", str(adapter), "-o", str(adapter / "merged")], [base, adapter], tmp_path,
             "lies inside")
    _refused(["merge", str(adapter), "-o", str(tmp_path), "--force"], [base, adapter], tmp_path,
             "contains")
    # through a symbolic link to the adapter
    link = tmp_path / "link"
    link.symlink_to(adapter)
    _refused(["merge", str(adapter), "-o", str(link), "--force"], [base, adapter], tmp_path, "is")
    assert link.is_symlink()


def test_export_init_extract_train_onto_an_input_are_refused(base, adapter, tiny_llama, tmp_path):
    _refused(["export", str(adapter), "-o", str(adapter), "--force"], [adapter], tmp_path, "is")
    _refused(["init", str(base), "-o", str(base), "--force", "-r", "2"], [base], tmp_path, "is")
    _refused(["init", str(base), "-o", str(base / "ad"), "-r", "2"], [base], tmp_path,
             "lies inside")
    tuned = Path(shutil.copytree(tiny_llama, tmp_path / "tuned"))
    _refused(["extract", "--base", str(base), "--tuned", str(tuned), "-r", "2", "-o", str(tuned),
              "--force"], [base, tuned], tmp_path, "is")
    data = chat_file(tmp_path / "data.jsonl")
    _refused(["train", str(adapter), "--data", str(data), "--steps", "1", "-o", str(data)],
             [adapter, data], tmp_path, "is")
    _refused(["train", str(adapter), "--data", str(data), "--steps", "1", "-o",
              str(adapter / "copy")], [adapter, data], tmp_path, "lies inside")
    _refused(["train", str(adapter), "--data", str(data), "--steps", "1", "-o", str(base / "x")],
             [adapter, data, base], tmp_path, "lies inside")


def test_check_output_unit(tmp_path):
    from adaptedit.atomic import check_output

    (tmp_path / "a" / "b").mkdir(parents=True)
    check_output(tmp_path / "c", inputs=[tmp_path / "a", None, "org/not-a-path"])  # fine
    with pytest.raises(AdapteditError, match="contains the input"):
        check_output(tmp_path / "a", inputs=[tmp_path / "a" / "b"], force=True)
    with pytest.raises(AdapteditError, match="already exists; pass --force"):
        check_output(tmp_path / "a", inputs=[tmp_path / "c"])
    check_output(tmp_path / "a", inputs=[tmp_path / "ab"], force=True)  # a prefix is not a parent
