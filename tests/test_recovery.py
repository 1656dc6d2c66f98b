"""What a killed or failing run leaves behind is recovered from (issue 11 items 10, 11, 17):
temporary folders of dead writers cleaned at the next run on the same path, a damaged newest
checkpoint skipped on --resume, a torn metrics line dropped, a full disk or a read-only folder
reported in one line, and long rows tokenized only as far as --max-length needs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import fixtures
from helpers import make_adapter, run_cli

from adaptedit.data import load as load_data
from adaptedit import leftovers
from adaptedit import checkpoints
from adaptedit import train as training
from adaptedit import train_run
from adaptedit.train_config import make_config
from adaptedit.errors import AdapteditError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(parent, name, what="tmp", pid=None, size=1000):
    """A temporary folder as a writer with ``pid`` leaves it when killed."""
    pid = dead_pid() if pid is None else pid
    host = leftovers._host()
    suffix = f"-{pid}-{host}" + ("-k3j2h1" if what == "tmp" else "")
    p = parent / f".{name}.{what}-{pid}-{host}" if what == "old" else parent / f".{name}.tmp{suffix}"
    p.mkdir(parents=True)
    (p / "model.safetensors").write_bytes(b"\0" * size)
    return p


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("recovery") / "ad")


def test_leftovers_of_dead_writers_are_removed_at_the_next_run(adapter, tmp_path):
    dead = leftover(tmp_path, "out", size=538_000)
    live = leftover(tmp_path, "out", pid=os.getppid())  # a writer that still runs
    other = leftover(tmp_path, "other")  # another output's: not this run's business
    legacy = tmp_path / ".out.tmp-abc123"  # no pid in the name: cannot tell, never touched
    legacy.mkdir()
    rc, _, err = run_cli(["export", str(adapter), "-o", str(tmp_path / "out")])
    assert rc == 0, err
    assert not dead.exists() and live.exists() and other.exists() and legacy.exists()
    assert f"removed {dead} (0.5 MB), left by process" in err.replace("\n", " ")
    assert (tmp_path / "out" / "adapter_config.json").exists()


def test_an_interrupted_replacement_is_put_back(adapter, tmp_path):
    """Killed between the two renames of --force: the old folder is restored, not deleted."""
    old = leftover(tmp_path, "out", what="old")
    rc, _, err = run_cli(["export", str(adapter), "-o", str(tmp_path / "out")])
    assert rc == 1 and "already exists; pass --force" in err
    assert not old.exists()
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == 1000


def test_tmp_names_carry_the_pid_and_the_host():
    name = leftovers.tmp_prefix("out") + "x1y2"
    m = leftovers.PATTERN.fullmatch(name)
    assert m and int(m["pid"]) == os.getpid() and m["name"] == "out" and m["what"] == "tmp"
    assert leftovers.alive(os.getpid()) and not leftovers.alive(dead_pid())


# ------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("recovery_data") / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a} plus 1 is", "completion": f" {a + 1}"})
                            + "\n" for a in range(12)))
    return path


def run_train(folder, data, out=None, resume=False, **kw):
    cfg, given = make_config({"data": str(data), "save_every": 1, "batch_size": 4, "lr": 1e-2,
                                "device": "cpu", **kw}, resume=resume)
    return training.train(training.prepare(folder, cfg, given=given, out=out, resume=resume))


@pytest.fixture(scope="module")
def three_steps(adapter, data, tmp_path_factory):
    """A finished 3-step run with a checkpoint at every step."""
    out = tmp_path_factory.mktemp("three") / "run"
    run_train(adapter, data, out=out, steps=3)
    return out


def _copy_run(run, dst, drop_last=True):
    import shutil

    shutil.copytree(run, dst)
    if drop_last:  # as if killed after step 2's checkpoint
        shutil.rmtree(dst / "checkpoints" / "step-000003")
    return dst


def test_resume_skips_a_damaged_checkpoint_and_ends_bit_identical(three_steps, adapter, data,
                                                                   tmp_path, capsys):
    run = _copy_run(three_steps, tmp_path / "run")
    (run / "checkpoints" / "step-000002" / checkpoints.STATE_JSON).write_text('{"step": 2, "conf')
    tmp = leftover(run / "checkpoints", "step-000003")  # a checkpoint a kill left half-written
    run_train(adapter, data, out=run, resume=True)
    err = capsys.readouterr().err
    assert "step-000002 (" in err and "is damaged; resuming from the earlier step-000001" in err
    assert not tmp.exists() and f"removed {tmp}" in err.replace("\n", " ")
    ref = load_file(str(three_steps / "adapter.safetensors"))
    got = load_file(str(run / "adapter.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert [p.name for p in checkpoints.checkpoint_dirs(run)] == ["step-000001", "step-000002",
                                                        "step-000003"]


def test_every_checkpoint_damaged_is_one_line(three_steps, adapter, data, tmp_path):
    run = _copy_run(three_steps, tmp_path / "run")
    for ck in checkpoints.checkpoint_dirs(run):
        (ck / checkpoints.STATE_TENSORS).write_bytes(b"garbage")
    with pytest.raises(AdapteditError, match=r"every checkpoint in .* is damaged \(newest: "
                                             r"step-000002 .*start a new run with -o NEW_DIR"):
        run_train(adapter, data, out=run, resume=True)


def test_a_torn_metrics_line_does_not_block_resume(three_steps, adapter, data, tmp_path):
    run = _copy_run(three_steps, tmp_path / "run")
    lines = (run / checkpoints.METRICS).read_text().splitlines()
    (run / checkpoints.METRICS).write_text("\n".join(lines) + '\n{"step": 3, "loss": 0.5, "lr"')  # torn
    run_train(adapter, data, out=run, resume=True)
    steps = [json.loads(x)["step"] for x in (run / checkpoints.METRICS).read_text().splitlines()]
    assert steps == [json.loads(x)["step"] for x in lines]  # each step once, in order


def test_a_full_disk_during_a_checkpoint_is_one_line(adapter, data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = checkpoints.write_adapter_files
    calls = []

    def full(adapter, folder):
        calls.append(folder)
        if len(calls) == 3:  # step 1: its checkpoint, then the adapter folder; step 2 fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real(adapter, folder)

    monkeypatch.setattr(checkpoints, "write_adapter_files", full)
    with pytest.raises(AdapteditError) as e:
        run_train(adapter, data, out=out, steps=3)
    msg = str(e.value)
    assert "\n" not in msg and "checkpoints: cannot save the checkpoint of step 2 (" in msg
    assert "No space left on device" in msg and "holds step 1" in msg and "--resume" in msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]  # no temp folder
    monkeypatch.setattr(checkpoints, "write_adapter_files", real)
    run_train(adapter, data, out=out, resume=True)  # the fix the message names works
    assert [p.name for p in checkpoints.checkpoint_dirs(out)][-1] == "step-000003"


def test_a_read_only_adapter_folder_is_refused_before_any_work(adapter, data, tmp_path,
                                                               monkeypatch):
    import shutil

    folder = tmp_path / "ad"
    shutil.copytree(adapter, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    if os.geteuid() == 0:  # root writes anywhere: make the probe meet a read-only folder

        def denied(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(train_run.tempfile, "mkstemp", denied)
    else:
        folder.chmod(0o555)
    try:
        rc, _, err = run_cli(["train", str(folder), "--data", str(data), "--steps", "1"])
    finally:
        folder.chmod(0o755)
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert f"error: {folder}: cannot write there (Permission denied)" in err
    assert "-o NEW_DIR" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# ------------------------------------------------------------------------------------ long rows


@pytest.fixture(scope="module")
def tok():
    return fixtures.make_tokenizer()


def _whole(tok, text, n):
    """The reference: the whole text tokenized, then truncated (what load did before)."""
    return tok(text, add_special_tokens=True)["input_ids"][:n]


@pytest.mark.parametrize("kind", ["words", "one_long_word", "digits_and_punctuation"])
def test_a_long_row_keeps_the_same_tokens_as_whole_tokenization(kind, tok, tmp_path):
    import random

    rng = random.Random(0)
    words = fixtures.CORPUS.split()
    text = {"words": " ".join(rng.choice(words) for _ in range(20_000)),
            "one_long_word": "".join(rng.choice("abcdefgh") for _ in range(60_000)),
            "digits_and_punctuation": "".join(rng.choice("0123456789.,;- \n") for _ in range(60_000)),
            }[kind]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "short row"}) + "\n")
    for n in (16, 100, 700):
        got = load_data(path, tok, max_length=n)
        assert got.example(0)[0].tolist() == _whole(tok, text, n), (kind, n)
        assert got.stats.truncated == 1 and got.example(1)[0].tolist()[-1] == tok.eos_token_id


def test_a_long_completion_is_masked_as_before(tok, tmp_path):
    prompt, completion = "Tom has 23 apples. " * 3, " He buys 15 more." * 5000
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    got = load_data(path, tok, max_length=64)
    enc = tok(prompt + completion, return_offsets_mapping=True)
    ids = enc["input_ids"][:64]
    trained = [e > len(prompt) and e > b for b, e in enc["offset_mapping"][:64]]
    assert got.example(0)[0].tolist() == ids and got.example(0)[1].tolist() == trained


def test_a_huge_row_costs_what_max_length_needs(tok, tmp_path):
    """A 20 MB row with --max-length 64: a bounded prefix is tokenized, not the whole row."""
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "The quick brown fox jumps. " * 750_000}) + "\n")
    t0 = time.perf_counter()
    got = load_data(path, tok, max_length=64)
    seconds = time.perf_counter() - t0
    assert len(got.example(0)[0]) == 64 and got.stats.truncated == 1
    assert seconds < 3.0, seconds  # whole: 208 s and 14 GB RSS for a 51 MB row on this machine
