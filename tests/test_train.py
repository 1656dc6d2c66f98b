"""train: the loss on trained positions equals transformers' own loss, loss decreases for every
method, SIGKILL + --resume and Ctrl-C + --resume end bit-identical to an uninterrupted run, a
non-finite loss stops with the last checkpoint kept, 2-process CPU data parallel ≈ one process,
and the command line (header, --json, --show-example, --config, provenance, refusals)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import chat_rows

from adaptedit import train as training
from adaptedit.checkpoints import STATE_JSON, STATE_TENSORS, checkpoint_dirs
from adaptedit.loss import TrainedPositions, loss_sum
from adaptedit.train_config import lr_at, make_config, same_file
from adaptedit.adapter import save_adapter
from adaptedit.formats import load_adapter
from adaptedit.data import IGNORE, collate
from adaptedit.errors import AdapteditError, UsageError
from adaptedit.init import InitOptions, build
from adaptedit.models import resolve

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("train")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    (d / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8, 1)))
    save_adapter(build(resolve(str(tiny_llama)), InitOptions(method="lora", rank=4)), d / "lora")
    return d


def make_adapter(tiny_llama, folder, **kw):
    save_adapter(build(resolve(str(tiny_llama)), InitOptions(**{"rank": 4, **kw})), folder)
    return folder


def run_train(folder, data, out=None, resume=False, **kw):
    cfg, given = make_config({"data": str(data), "save_every": 0, **kw}, resume=resume)
    run = training.prepare(folder, cfg, given=given, out=out, resume=resume)
    return training.train(run)


def tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter.safetensors"))


def cli(*args, timeout=120, **popen):
    return [sys.executable, "-m", "adaptedit", *map(str, args)]


# -------------------------------------------------------------------------------------- the loss


def test_loss_on_trained_positions_equals_transformers_loss(tiny_llama, work):
    from adaptedit.data import load as load_data

    source = resolve(str(tiny_llama))
    d = load_data(work / "small.jsonl", source.tokenizer(), max_length=64)
    batch = collate([d.example(i) for i in range(4)], pad_id=0)
    model = source.load(dtype=torch.float32)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        ref = model(**batch).loss * n  # transformers: mean over non-ignored shifted labels
        positions = TrainedPositions(model)
        got = loss_sum(model, positions, batch, torch.device("cpu"))
    assert torch.allclose(got, ref, rtol=1e-5), (got, ref)


def test_lr_schedule():
    lrs = [lr_at(s, 10, 1.0, "cosine", 2) for s in range(10)]
    assert lrs[:3] == [1 / 3, 2 / 3, 1.0] and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] > 0
    assert [lr_at(s, 4, 1.0, "linear", 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_at(7, 10, 0.5, "constant", 0) == 0.5


@pytest.mark.parametrize("method,dora", [("lora", False), ("pissa", False), ("milora", False),
                                         ("olora", False), ("delora", False), ("lora", True),
                                         ("pissa", True)])
def test_loss_decreases(tiny_llama, work, tmp_path, method, dora):
    folder = make_adapter(tiny_llama, tmp_path / "a", method=method, dora=dora)
    before = tensors(folder)
    lr = 5e-2 if method in ("delora", "milora") else 1e-2
    s = run_train(folder, work / "small.jsonl", steps=8, batch_size=8, lr=lr,
                  lr_schedule="constant")
    assert s["final_loss"] < s["first_loss"] - 0.05, s
    after = load_adapter(folder)
    t = after.config.training
    assert t["steps"] == 8 and t["lr"] == lr and t["final_loss"] == s["final_loss"]
    assert t["data"]["sha256"] and t["batch_size"] == 8 and t["alpha"] == after.config.alpha
    # θ moved, θ₀ did not
    now = tensors(folder)
    assert not torch.equal(now[next(k for k in now if k.endswith(".lora_B"))],
                           before[next(k for k in before if k.endswith(".lora_B"))])
    for k in before:
        if k.endswith(("A0", "B0", "magnitude0", "lambda0", "wnorm")):
            assert torch.equal(before[k], now[k]), k
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 9))


# --------------------------------------------------------------------------- checkpoints, resume


@pytest.fixture(scope="module")
def reference(work):
    """An uninterrupted run: 9 steps, checkpoints every 3."""
    out = work / "ref"
    run_train(work / "lora", work / "train.jsonl", out=out, steps=9, batch_size=4, lr=1e-2,
              save_every=3)
    return out


def test_checkpoint_layout(reference):
    steps = [p.name for p in checkpoint_dirs(reference)]
    assert steps == ["step-000003", "step-000006", "step-000009"]
    for name in steps:
        ck = reference / "checkpoints" / name
        assert {p.name for p in ck.iterdir()} == {"adaptedit.json", "adapter.safetensors",
                                                  STATE_JSON, STATE_TENSORS}
        load_adapter(ck)  # each checkpoint is a native adapter folder
        st = json.loads((ck / STATE_JSON).read_text())
        assert st["step"] == int(name[5:]) and st["position"] == st["step"] * 4
    assert torch.equal(tensors(reference)["model.layers.0.self_attn.q_proj.lora_B"],
                       tensors(reference / "checkpoints/step-000009")[
                           "model.layers.0.self_attn.q_proj.lora_B"])
    for p in reference.rglob("*"):  # no pickle anywhere
        assert p.suffix not in (".pt", ".bin", ".pkl", ".pth")


def _launch(work, out, extra=()):
    return subprocess.Popen(cli("train", work / "lora", "--data", work / "train.jsonl", "-o", out,
                                "--steps", 9, "--batch-size", 4, "--lr", 1e-2, "--save-every", 3,
                                "-q", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def _wait_for(path, proc, timeout=60):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def test_sigkill_then_resume_is_bit_identical(work, reference):
    out = work / "killed"
    proc = _launch(work, out)
    _wait_for(out / "checkpoints" / "step-000003", proc)
    proc.kill()
    proc.wait()
    done = checkpoint_dirs(out)
    assert done and int(done[-1].name[5:]) < 9
    run_train(work / "lora", work / "train.jsonl", out=out, resume=True)
    ref, got = tensors(reference), tensors(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    losses = lambda f: [json.loads(x).get("loss") for x in (f / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(out) == losses(reference)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_the_exact_state(work, sig):
    """Ctrl-C, or SIGTERM from a scheduler: a checkpoint of the exact state, exit 128 + signal.

    Deterministic: the run is far too long to end before the signal (sent once its first
    checkpoint exists), and its constant learning rate makes its first steps those of any shorter
    run, so the checkpoint is compared with an uninterrupted run of the same number of steps
    (resume from a checkpoint is checked bit for bit by the SIGKILL test above)."""
    from safetensors.torch import load_file

    out = work / f"interrupted-{int(sig)}"
    proc = _launch(work, out, ["--steps", 100_000, "--lr-schedule", "constant"])
    _wait_for(out / "checkpoints" / "step-000003", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + int(sig), err
    found = re.search(rb"interrupted at step (\d+)", err)
    assert found and b"--resume" in err, err
    step = int(found[1])
    assert 3 <= step < 100_000
    last = checkpoint_dirs(out)[-1]
    assert last.name == f"step-{step:06d}"
    ref = work / f"uninterrupted-{int(sig)}"
    run_train(work / "lora", work / "train.jsonl", out=ref, steps=step, batch_size=4, lr=1e-2,
              lr_schedule="constant", save_every=step)
    ref_ck = ref / "checkpoints" / last.name
    for name in ("adapter.safetensors", STATE_TENSORS):  # weights, and the optimizer state
        a, b = load_file(str(ref_ck / name)), load_file(str(last / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((last / STATE_JSON).read_text())["step"] == step


def test_resume_refuses_changed_options_and_missing_checkpoints(work, reference, tmp_path):
    with pytest.raises(UsageError, match=r"--lr to 0.5 \(the run has 0.01\)"):
        run_train(work / "lora", work / "train.jsonl", out=reference, resume=True, lr=0.5)
    with pytest.raises(AdapteditError, match="already finished"):
        run_train(work / "lora", work / "train.jsonl", out=reference, resume=True)
    with pytest.raises(AdapteditError, match="already exists"):
        run_train(work / "lora", work / "train.jsonl", out=reference, steps=2)
    with pytest.raises(AdapteditError, match="holds checkpoints of an earlier run"):
        run_train(reference, work / "train.jsonl", steps=2)
    with pytest.raises(AdapteditError, match="found no checkpoint"):
        run_train(work / "lora", work / "train.jsonl", out=tmp_path, resume=True)


def test_data_paths_are_recorded_absolute_so_resume_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, given = make_config({"data": "d/train.jsonl", "eval_data": "d/valid.jsonl"})
    assert cfg.data == str(tmp_path / "d/train.jsonl") and "data" in given
    assert cfg.eval_data == str(tmp_path / "d/valid.jsonl")
    assert same_file(cfg.data, str(tmp_path / "d" / ".." / "d" / "train.jsonl"))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(work, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(AdapteditError) as e:
        run_train(work / "lora", work / "train.jsonl", out=out, steps=6, batch_size=4, lr=1e30,
                  save_every=1, max_grad_norm=0)
    msg = str(e.value)
    assert "is nan at step" in msg or "is inf at step" in msg
    assert "lower --lr" in msg and "the last checkpoint" in msg
    last = checkpoint_dirs(out)[-1]
    assert torch.equal(tensors(out)["model.layers.0.self_attn.q_proj.lora_A"],
                       tensors(last)["model.layers.0.self_attn.q_proj.lora_A"])
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["error"]


def test_injected_nan_gradient_stops(work, tmp_path, monkeypatch):
    real = training.loss_sum
    monkeypatch.setattr(training, "loss_sum", lambda *a: real(*a) * float("nan"))
    with pytest.raises(AdapteditError, match="loss is nan at step 1 .*adapter folder is unchanged"):
        run_train(work / "lora", work / "train.jsonl", out=tmp_path / "x", steps=3, batch_size=4)


def test_two_process_data_parallel_matches_one_process(work, tmp_path):
    common = ["--data", work / "train.jsonl", "--steps", 3, "--lr", 1e-2, "--save-every", 0, "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([str(x) for x in [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), "-m", "adaptedit",
                        "train", work / "lora", "-o", tmp_path / "ddp", "--batch-size", 2, *common]],
                       capture_output=True, cwd=ROOT, env=env, timeout=180)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    run_train(work / "lora", work / "train.jsonl", out=tmp_path / "one", steps=3, lr=1e-2,
              batch_size=2, grad_accum=2)
    a, b = tensors(tmp_path / "ddp"), tensors(tmp_path / "one")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    la = [json.loads(x)["loss"] for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-5)
    assert load_adapter(tmp_path / "ddp").config.training["world_size"] == 2


# ------------------------------------------------------------------------------------------ CLI


def test_cli_json_config_and_header(work, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[train]\nsteps = 2\nbatch-size = 4\nlr = 0.01\neval-split = 0.25\n')
    code, out, err = run_cli(["train", str(work / "lora"), "--data", str(work / "train.jsonl"),
                              "--config", str(cfg), "--steps", "3", "-o", str(tmp_path / "o"),
                              "--json"])
    assert code == 0, err
    s = json.loads(out)
    assert s["steps"] == 3 and s["eval_loss"] is not None and s["header"]["eval_examples"] == 6
    assert "masked with -100" in s["header"]["masking"]
    cfg.write_text("stpes = 2\n")
    code, _, err = run_cli(["train", str(work / "lora"), "--data", "x.jsonl", "--config", str(cfg)])
    assert code == 2 and "unknown option 'stpes'" in err
    code, _, err = run_cli(["train", str(work / "lora"), "--data", "x.jsonl", "--steps", "2",
                            "--epochs", "1"])
    assert code == 2 and "either --steps or --epochs" in err


def test_cli_plain_log_and_summary(work, tmp_path):
    code, out, err = run_cli(["train", str(work / "lora"), "--data", str(work / "train.jsonl"),
                              "--steps", "2", "-b", "4", "-o", str(tmp_path / "o")])
    assert code == 0, err
    assert "masked with -100" in err and "step 2/2" in err and "final_loss" in out


def test_show_example(work):
    code, out, err = run_cli(["train", str(work / "lora"), "--data", str(work / "train.jsonl"),
                              "--show-example"])
    assert code == 0, err
    assert "⟦" in out and "<|im_end|>⟧" in out and "label -100" in out
    assert not (work / "lora" / "metrics.jsonl").exists()
    code, out, _ = run_cli(["train", str(work / "lora"), "--data", str(work / "train.jsonl"),
                            "--show-example", "--json"])
    ex = json.loads(out)
    assert len(ex["labels"]) == ex["tokens"] and -100 in ex["labels"]


def test_bad_data_is_a_one_line_error(work, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 1}\n')
    code, _, err = run_cli(["train", str(work / "lora"), "--data", str(bad), "--steps", "1"])
    assert code == 1 and err.strip().count("\n") == 0
    assert f"{bad}:2: 'text' must be a string" in err


def test_eval_every_without_eval_data_is_refused(work, tmp_path):
    """--eval-every with nothing to evaluate was silently ignored (no eval loss, exit 0)."""
    out = tmp_path / "run"
    code, _, err = run_cli(["train", str(work / "lora"), "--data", str(work / "train.jsonl"),
                            "--steps", "2", "--eval-every", "1", "-o", str(out)])
    assert code == 2 and err.startswith("error: --eval-every needs held-out data"), err
    assert not out.exists()
    code, out_json, err = run_cli(["train", str(work / "lora"), "--data", str(work / "train.jsonl"),
                                   "--eval-split", "0.25", "--steps", "2", "--eval-every", "1",
                                   "-o", str(out), "--json"])
    assert code == 0, err
    assert json.loads(out_json)["eval_loss"] is not None


@pytest.mark.slow
def test_real_smollm2_learns_the_demo_task(tmp_path):
    """The embedded SmolLM2-135M on examples/dates (chat rows): loss falls within 12 steps."""
    source = resolve(None)
    data = ROOT / "examples/dates/train.jsonl"
    save_adapter(build(source, InitOptions(method="pissa", rank=8, svd="randomized")),
                 tmp_path / "a")
    s = run_train(tmp_path / "a", data, steps=12, batch_size=8, lr=2e-4, max_length=128)
    assert s["final_loss"] < s["first_loss"], s


def test_grad_checkpointing_gives_the_same_update_without_warnings(work, tmp_path):
    """Activation checkpointing recomputes the forward in backward: the trained adapter equals the
    plain run's (float32, 1e-6), and transformers' deprecation of the old method name is not shown."""
    import warnings

    plain = tmp_path / "plain"
    run_train(work / "lora", work / "small.jsonl", out=plain, steps=3, batch_size=4, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        run_train(work / "lora", work / "small.jsonl", out=tmp_path / "ckpt", steps=3,
                  batch_size=4, lr=1e-2, grad_checkpointing=True)
    a, b = tensors(plain), tensors(tmp_path / "ckpt")
    moved = max(float((a[k] - tensors(work / "lora")[k]).abs().max()) for k in a)
    assert moved > 1e-4  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
