"""Data safety (issue 11 items 1-9): no NaN/Inf written and called verified, no input destroyed
whatever the flags, no overwrite without --force (even of something created meanwhile), one
writer per adapter folder, no pickle loaded, modes from the umask, no writing through links.

Every case asserts the exit code, the one-line message, that the inputs are byte-identical
afterwards and that nothing is left behind."""

import json
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
    from adaptedit import merge

    ad = make_adapter(tiny_llama, tmp_path / "ad2", method="lora", rank=4)
    _poison_untargeted(base)
    monkeypatch.setattr(merge, "check_finite", lambda *a, **k: None)
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


# ------------------------------------------------------------- 3. inspect --html / --plot files


def test_inspect_html_and_plot_never_overwrite_without_force(adapter, tmp_path):
    pytest.importorskip("matplotlib")
    victim = tmp_path / "notes.txt"
    victim.write_text("keep me\n")
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "spectrum.png").write_bytes(b"an earlier plot")
    before = snapshot(adapter, victim, tmp_path / "plots")
    code, _, err = run_cli(["inspect", str(adapter), "--html", str(victim), "-q"])
    assert code == 1
    assert one_line(err) == f"error: {victim}: already exists; pass --force to replace it"
    code, _, err = run_cli(["inspect", str(adapter), "--plot", str(tmp_path / "plots"), "-q"])
    assert code == 1
    assert one_line(err) == (f"error: --plot {tmp_path / 'plots'}: spectrum.png already exists; "
                             "pass --force to replace the plots, or choose another folder")
    # an input is never an output, even with --force
    code, _, err = run_cli(["inspect", str(adapter), "--html", str(adapter / "adaptedit.json"),
                            "--force", "-q"])
    assert code == 1 and "lies inside the input" in one_line(err)
    assert snapshot(adapter, victim, tmp_path / "plots") == before
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "plots") == []
    # --force replaces them
    code, _, err = run_cli(["inspect", str(adapter), "--html", str(victim), "--plot",
                            str(tmp_path / "plots"), "--force", "-q"])
    assert code == 0, err
    assert victim.read_text().startswith("<!DOCTYPE html>") or "<html" in victim.read_text()
    assert (tmp_path / "plots" / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    assert snapshot(adapter) == {k: v for k, v in before.items() if k.startswith(str(adapter))}


# ------------------------------------------------- 4. the final rename never replaces anything


def test_two_writers_of_one_folder_exactly_one_wins(tmp_path):
    """Two writers race to the same output (a barrier holds both until each has written its
    temporary folder): exactly one is published, the other fails and leaves no trace."""
    from adaptedit.atomic import write_atomic_dir

    out = tmp_path / "out"
    barrier = threading.Barrier(2)
    results = {}

    def writer(tag):
        def write(tmp):
            (tmp / "who").write_text(tag)
            barrier.wait(timeout=30)
        try:
            write_atomic_dir(out, write, force=False)
            results[tag] = "ok"
        except AdapteditError as e:
            results[tag] = str(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [t for t, r in results.items() if r == "ok"]
    assert len(winners) == 1, results
    loser = ({"a", "b"} - set(winners)).pop()
    assert results[loser] == (f"{out}: was created by another process while this one was "
                              "writing; left it as it is and wrote nothing (pass --force to "
                              "replace it, or choose another output path)")
    assert (out / "who").read_text() == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_merge_keeps_a_folder_created_while_it_runs(tiny_llama, adapter, tmp_path, monkeypatch):
    from adaptedit import merge

    out = tmp_path / "m"
    real = merge.write_side_files

    def meanwhile(*a, **k):  # another process creates OUT while the merge writes
        real(*a, **k)
        out.mkdir()
        (out / "theirs.txt").write_text("someone else's work\n")

    monkeypatch.setattr(merge, "write_side_files", meanwhile)
    code, _, err = run_cli(["merge", str(adapter), "-o", str(out), "--no-verify"])
    assert code == 1
    assert one_line(err) == (f"error: {out}: was created by another process while this one was "
                             "writing; left it as it is and wrote nothing (pass --force to replace "
                             "it, or choose another output path)")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert leftovers(tmp_path) == []


def test_force_swaps_the_folder_atomically(tmp_path):
    from adaptedit.atomic import write_atomic_dir

    out = tmp_path / "out"
    write_atomic_dir(out, lambda t: (t / "v").write_text("1"), force=False)
    write_atomic_dir(out, lambda t: (t / "v").write_text("2"), force=True)
    assert (out / "v").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --------------------------------------------------------------------- 5. one writer per folder


_HOLD = """
import sys, time
from adaptedit.atomic import folder_lock
with folder_lock(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_second_writer_is_refused_naming_the_first_then_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from adaptedit.atomic import LOCK_NAME, folder_lock

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(AdapteditError) as e:
            with folder_lock(tmp_path, "train"):
                pass
        assert str(e.value) == (f"{tmp_path}: another adaptedit train (pid {p.pid}) is writing "
                                "this folder; wait for it to finish or stop it")
    finally:
        p.kill()
        p.wait()
    # SIGKILL: the lock file stays with a dead pid, its flock died with the process
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(p.pid)
    with folder_lock(tmp_path, "train") as stale:
        assert stale == p.pid
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


def test_train_is_refused_while_another_run_holds_the_folder(adapter, tmp_path):
    from adaptedit.atomic import folder_lock

    data = chat_file(tmp_path / "data.jsonl")
    before = snapshot(adapter)
    with folder_lock(adapter, "train"):
        code, _, err = run_cli(["train", str(adapter), "--data", str(data), "--steps", "1",
                                "--device", "cpu", "-q"])
        assert code == 1
        assert one_line(err) == (f"error: {adapter}: another adaptedit train (pid {os.getpid()}) "
                                 "is writing this folder; wait for it to finish or stop it")
        assert {k: v for k, v in snapshot(adapter).items() if ".adaptedit.lock" not in k} == before
    assert snapshot(adapter) == before


# -------------------------------------------------------------------------- 6. never a pickle


def test_pickle_next_to_safetensors_is_never_loaded(base, adapter, tmp_path):
    """transformers would unpickle pytorch_model.bin (here: not even a pickle) if it looked at it;
    merge's verification loads the base and the merged folder, and must read safetensors only."""
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle: loading this fails")
    code, out, err = run_cli(["merge", str(adapter), "-o", str(tmp_path / "m"), "--json"])
    assert code == 0, err
    assert json.loads(out)["verified"] is True
    from adaptedit.models import resolve

    model = resolve(str(base)).load()
    ref = load_file(str(base / "model.safetensors"))
    k = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[k], ref[k])


def test_folder_whose_weights_transformers_would_not_load_is_refused(base, tmp_path):
    (base / "model.safetensors").rename(base / "weights.safetensors")
    (base / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle")
    before = snapshot(base)
    code, _, err = run_cli(["init", str(base), "-o", str(tmp_path / "ad"), "-r", "2"])
    assert code == 1
    assert one_line(err) == (f"error: {base}: the weights are in weights.safetensors, a name "
                             "transformers does not load; rename it to model.safetensors (or "
                             "shards with model.safetensors.index.json)")
    (base / "weights.safetensors").unlink()
    code, _, err = run_cli(["init", str(base), "-o", str(tmp_path / "ad"), "-r", "2"])
    assert code == 1
    assert "only pickle weights (pytorch_model.bin)" in one_line(err)
    assert "never unpickles" in err
    assert not (tmp_path / "ad").exists() and leftovers(tmp_path) == []
    assert snapshot(base) == {k: v for k, v in before.items() if "weights.safetensors" not in k}


# ---------------------------------------------------------------------------------- 7. umask


def test_outputs_honour_the_umask(base, adapter, tmp_path):
    import stat

    os.chmod(base / "model.safetensors", 0o600)
    data = chat_file(tmp_path / "data.jsonl")
    old = os.umask(0o077)
    try:
        runs = [["merge", str(adapter), "-o", str(tmp_path / "m"), "-q"],
                ["export", str(adapter), "-o", str(tmp_path / "p"), "-q"],
                ["init", str(base), "-o", str(tmp_path / "i"), "-r", "2", "-q"],
                ["train", str(adapter), "-o", str(tmp_path / "t"), "--data", str(data),
                 "--steps", "1", "--batch-size", "2", "--device", "cpu", "-q"]]
        for args in runs:
            code, _, err = run_cli(args)
            assert code == 0, (args, err)
    finally:
        os.umask(old)
    for name in ("m", "p", "i", "t"):
        for p in [tmp_path / name, *(tmp_path / name).rglob("*")]:
            want = 0o700 if p.is_dir() else 0o600
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


# ------------------------------------------------------------- 8. no writing through a link


def test_train_never_writes_through_a_symlink_in_the_adapter_folder(adapter, tmp_path):
    data = chat_file(tmp_path / "data.jsonl")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (adapter / "metrics.jsonl").symlink_to(victim)
    before = snapshot(adapter, victim, data)
    code, _, err = run_cli(["train", str(adapter), "--data", str(data), "--steps", "1",
                            "--batch-size", "2", "--device", "cpu", "-q"])
    assert code == 1
    assert one_line(err) == (f"error: {adapter / 'metrics.jsonl'}: is a symbolic link; adaptedit "
                             "never writes through links inside an adapter folder; remove it")
    assert snapshot(adapter, victim, data) == before


def test_open_append_refuses_a_link(tmp_path):
    from adaptedit.atomic import open_append

    (tmp_path / "t").write_text("x\n")
    (tmp_path / "l").symlink_to(tmp_path / "t")
    with pytest.raises(AdapteditError, match="is a symbolic link"):
        open_append(tmp_path / "l")
    assert (tmp_path / "t").read_text() == "x\n"


# ------------------------------------------------ 9. train -o stopped before its first checkpoint


def test_resume_of_a_copy_without_checkpoint_starts_at_step_0(adapter, tmp_path, monkeypatch):
    from adaptedit import train as training

    data = chat_file(tmp_path / "data.jsonl")
    out = tmp_path / "copy"
    args = ["train", str(adapter), "-o", str(out), "--data", str(data), "--steps", "2",
            "--batch-size", "2", "--device", "cpu", "-q"]

    def crash(*a, **k):  # the run dies after the copy is written, before any checkpoint
        raise MemoryError("simulated")

    with monkeypatch.context() as m:
        m.setattr(training, "_train", crash)
        code, _, err = run_cli(args)
        assert code == 1 and "MemoryError" in err
    assert (out / "adaptedit.json").exists() and not (out / "checkpoints").exists()
    code, _, err = run_cli(args)
    assert code == 1 and "already exists; pass --resume" in one_line(err)
    code, out_json, err = run_cli([*args, "--resume", "--json"])
    assert code == 0, err
    summary = json.loads(out_json)
    assert summary["steps"] == 2 and summary["header"]["start_step"] == 0
    # the same run as a clean one into a fresh folder
    code, clean, err = run_cli([*args[:3], str(tmp_path / "clean"), *args[4:], "--json"])
    assert code == 0, err
    assert json.loads(clean)["final_loss"] == summary["final_loss"]
    assert not (out / ".adaptedit.lock").exists()


def test_compare_onto_its_data_or_base_is_refused(base, tmp_path):
    data = chat_file(tmp_path / "data.jsonl")
    common = [str(base), "--data", str(data), "--eval-data", str(data), "--methods", "lora",
              "--lr", "1e-3", "--steps", "1", "--batch-size", "2", "--rank", "2"]
    _refused(["compare", *common, "-o", str(data)], [data, base], tmp_path, "is")
    _refused(["compare", *common, "-o", str(base / "cmp")], [data, base], tmp_path, "lies inside")


@pytest.mark.slow
def test_two_concurrent_merges_to_one_path_exactly_one_wins(adapter, tmp_path):
    """Two `adaptedit merge -o SAME` processes at once: one exits 0 and its folder is complete,
    the other exits 1 with one line (the output existed at its start, or appeared meanwhile)."""
    import subprocess
    import sys

    out = tmp_path / "m"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "adaptedit", "merge", str(adapter), "-o", str(out), "-q"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 1], results
    err = next(e for c, e in results if c == 1)
    line = one_line(err)
    assert line in (f"error: {out}: already exists; pass --force to replace it",
                    f"error: {out}: was created by another process while this one was writing; "
                    "left it as it is and wrote nothing (pass --force to replace it, or choose "
                    "another output path)"), line
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert leftovers(tmp_path) == []
